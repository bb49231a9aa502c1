"""Deployment: other frameworks' weights in and out of retina (``convert.py``: torchvision's
RetinaNet weights -> a retina checkpoint, ``retina convert torchvision``)."""
