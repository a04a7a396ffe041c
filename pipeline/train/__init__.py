"""Fine-tuning DTC on Ray Train: the library behind `python -m jobs.train` (DTC_MODEL.md "Training").

    config.py    TrainConfig: typed, documented settings; the recipe fields and their digest (no torch)
    catalog.py   the learnable synthetic training catalog (photos that show the product; no torch)
    dataset.py   training rows as Ray Data: the render job's read, validation and prepare_pair (no torch)
    samples.py   prepared samples in memory, the deterministic order, per-sample augmentation
    vgg.py       VGG19's trunk in pure torch with torchvision's state-dict layout; the perceptual loss
    loss.py      TrainableDTC: the inference conditioning and predict_noise with gradient; the losses
    step.py      Engine: one AdamW step, the validation loss, a worker's state on disk (no Ray)
    loop.py      train_loop_per_worker: DDP, the dataset shard, checkpoints, train.jsonl, progress
    faults.py    the chaos tests' worker death and stall (YAML `fault_injection` only)
    export.py    a checkpoint -> model/, a DTC folder with its own digest (runs in a Ray task)
    report.py    runs/<run_id>.json and the one-screen summary (no torch)
    recipe.py    the driver as steps: check -> prepare -> train -> export -> close; run_train

Importing this package imports nothing.
"""
