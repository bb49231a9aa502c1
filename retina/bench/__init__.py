"""Speed harnesses, outside the library's core: ``detector.py`` (retina vs torchvision's RetinaNet,
run by ``tools/benchmark.py``), ``eval_backends.py`` (pycocotools vs faster-coco-eval, run by
``tools/benchmark_eval.py``) and ``inference.py`` (inference lever by lever: BatchNorm folding,
channels_last, torch.compile, onnxruntime; ``tools/benchmark.py --levers``)."""
