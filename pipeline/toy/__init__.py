"""The train-tiny toy: a learnable synthetic catalog, its stage-0 VAE fit, weights-free identity
metrics and small in-process runs (ablation folders, the CI recipe). Not the training job:
`pipeline.train` imports nothing from here (tests/unit/test_import_cycles.py); the toy drives the
training job as any user does. One line per module: docs/files.md, under pipeline/toy/.

Importing this package imports nothing.
"""
