"""Fine-tuning DTC on Ray Train: the library behind `python -m jobs.train` (DTC_MODEL.md "Training").

The driver runs as steps (`recipe.py`: check -> prepare -> train -> export -> close); each worker
runs `loop.train_loop_per_worker`. One line per module: docs/files.md, under pipeline/train/
(the one map, kept complete by tests/unit/test_readme_contracts.py); the user guide is
docs/training.md.

Importing this package imports nothing.
"""
