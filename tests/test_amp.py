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
        features = model.features(model.preprocess(images)[0])
        losses = model(images, targets)
    assert features[0].dtype == torch.bfloat16  # autocast is really on
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


@pytest.mark.parametrize("amp, native, dtype, says", [
    ("auto", True, torch.bfloat16, "bf16 autocast"),
    ("auto", False, None, "fp32"),
    ("bf16", True, torch.bfloat16, None),
    ("bf16", False, torch.bfloat16, "warning: train.amp=bf16"),  # kept as asked, with a warning
    ("off", True, None, None),
    ("fp16", False, torch.float16, None),
])
def test_amp_resolves_by_the_cpus_bf16_instructions(amp, native, dtype, says):
    from retina.engine.precision import autocast_dtype

    got, line = autocast_dtype(amp, torch.device("cpu"), native_bf16=native)
    assert got == dtype
    assert (line is None) if says is None else (says in line)


def test_amp_auto_on_a_gpu_without_bf16_is_fp16():
    from retina.engine.precision import autocast_dtype

    assert autocast_dtype("auto", torch.device("cuda"), native_bf16=True)[0] == torch.bfloat16
    assert autocast_dtype("auto", torch.device("cuda"), native_bf16=False)[0] == torch.float16


def test_trainer_logs_what_amp_auto_picked(shapes_root, tmp_path, monkeypatch, capsys):
    import retina.engine.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    cfg = tiny_config(shapes_root, solver={"max_iter": 1, "warmup_iters": 0},
                      train={"amp": "auto", "eval_at_end": False})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu")
    assert trainer.amp_dtype is None and not trainer.state.scaler.is_enabled()
    assert "train.amp=auto: fp32 (this CPU" in capsys.readouterr().out
