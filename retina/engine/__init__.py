"""Engine: everything that runs a model over data.

- ``train.py``: the training loop (``Trainer``): resumable runs, checkpoints, periodic evaluation.
- ``checkpoint.py``: writing and reading checkpoints (tensors and plain values only).
- ``optim.py``: optimizer and learning-rate schedule from ``SolverConfig``.
- ``precision.py``: the autocast dtype of ``train.amp`` on the run's device (``auto``).
- ``dist.py``: torch.distributed setup and rank queries.
- ``preflight.py``: checks before training starts (a writable run directory with room for
  checkpoints) and the one-line text of a DataLoader worker's error.
- ``logger.py``: training telemetry (log lines, metrics.jsonl, TensorBoard).
- ``evaluate.py``: COCO box evaluation of a model on a dataset.
- ``validation.py``: evaluation during and after training, sharded over ranks.
- ``predict.py``: detection on image files (``retina predict``).

Import the submodules directly; this package imports nothing, so that ``import
retina.engine.evaluate`` stays light.
"""
