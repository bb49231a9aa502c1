"""Deployment: other frameworks' weights in and out of retina, and the trained model out of it.

- ``convert.py``: torchvision's RetinaNet weights -> a retina checkpoint (``retina convert torchvision``).
- ``export.py``: the whole detector as one ONNX / torch.export file, parity checked (``retina export``);
  ``graph.py`` is the exported module, ``parity.py`` the comparison, ``runtime.py`` runs an exported
  file behind the model's interface (``retina predict/eval --weights model.onnx``).
- ``fuse.py``: the inference-time model of ``retina eval`` / ``predict`` (BatchNorm folded into the
  convolutions, memory format chosen for the device).
"""
