"""Speed harnesses and the training race, outside the library (not in the wheel). Run from the
top of the repository, each module with its own flags (``--help``):

- ``python -m benchmarks.detector``: retina against torchvision's RetinaNet, part by part (train
  step, inference, loss, post-processing), in one process;
- ``python -m benchmarks.inference``: inference lever by lever (BatchNorm folding, channels_last,
  torch.compile, onnxruntime);
- ``python -m benchmarks.eval_backends``: pycocotools against faster-coco-eval;
- ``python -m benchmarks.race``: ``retina train`` against torchvision's RetinaNet at equal
  wall-clock time on a photo folder (the contestants: ``contestants.py``).
- ``python -m benchmarks.cli``: how long ``retina --help`` and a config error take to answer,
  beside ``import torch``.

``timing.py`` holds how a call is measured (wall and CPU seconds, peak memory).
"""
