"""Speed harnesses, outside the library's core: ``detector.py`` (retina vs torchvision's RetinaNet,
run by ``tools/benchmark.py``) and ``eval_backends.py`` (pycocotools vs faster-coco-eval, run by
``tools/benchmark_eval.py``)."""
