"""Mixed precision on the CPU: bf16 autocast trains with finite fp32 losses; channels_last too."""

from __future__ import annotations

import pytest
import torch

from retina.data import generate_shapes
from retina.engine.checkpoint import load_checkpoint
from retina.engine.train import Trainer
from tinyrun import TINY_DATA, tiny_config


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **TINY_DATA)
    return root


def test_bf16_forward_computes_losses_in_fp32(shapes_root):
    from retina.model import build_model

    cfg = tiny_config(shapes_root, model={"num_classes": 3})
    model = build_model(cfg).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.fpn(model.backbone(model.preprocess(images)[0]))
        losses = model(images, targets)
    assert next(iter(features.values())).dtype == torch.bfloat16  # autocast is really on
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("changes", [{"train": {"amp": "bf16"}},
                                     {"train": {"amp": "bf16"}, "model": {"channels_last": True}}])
def test_bf16_training_steps(shapes_root, tmp_path, changes):
    cfg = tiny_config(shapes_root, solver={"max_iter": 4, "warmup_iters": 0},
                      train={"log_period": 1, "eval_at_end": False, **changes["train"]},
                      **({"model": changes["model"]} if "model" in changes else {}))
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = load_checkpoint(tmp_path / "run" / "model_final.pth")["model"]
    assert after["head.cls_logits.weight"].dtype == torch.float32  # master weights stay fp32
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert not torch.equal(before["head.cls_logits.weight"], after["head.cls_logits.weight"])
