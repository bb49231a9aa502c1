"""Starting from a detector (``model.init``, retina/engine/init.py) and the EMA of the weights
(``train.ema``, retina/engine/ema.py): what is loaded, what is re-initialised, the one-line
report, the averaging formula by hand, checkpoints and evaluation of the averaged weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from retina.cli import main
from retina.data import generate_shapes
from retina.engine.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from retina.engine.ema import build_ema, ema_decay, ema_state, load_ema_state
from retina.engine.init import load_init
from retina.engine.train import Trainer
from retina.engine.validation import Validator
from retina.model import build_model
from tinyrun import TINY_DATA, tiny_config, with_changes

CLS = ("head.cls_logits.weight", "head.cls_logits.bias")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, **TINY_DATA)
    return root


def trained_like(cfg, seed: int) -> dict:
    """A state dict of ``cfg``'s model whose every float tensor moved off its initial value."""
    torch.manual_seed(seed)
    if cfg.model.num_classes is None:  # null: the tiny shapes set's 3
        cfg = with_changes(cfg, model={"num_classes": 3})
    state = build_model(cfg, pretrained=False).state_dict()
    return {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in state.items()}


def weights_of(state: dict) -> list[str]:
    return [k for k in state if k != "num_pos_ema"]  # run state, not a weight


# --------------------------------------------------------------------------------- init
def test_three_class_checkpoint_into_one_class_model(shapes_root, tmp_path):
    cfg3 = with_changes(tiny_config(shapes_root), model={"num_classes": 3})
    source = trained_like(cfg3, seed=1)
    path = save_checkpoint({"model": source, "class_names": ["a", "b", "c"]}, tmp_path / "three.pth")
    torch.manual_seed(2)
    model = build_model(with_changes(cfg3, model={"num_classes": 1}), pretrained=False)
    line = load_init(model, path, ["raccoon"], prior_prob=0.01)

    state = model.state_dict()
    total = len(weights_of(state))  # every tensor of the model but the loss's running count
    assert line == (f"init: {total - 2}/{total} tensors from {path}; "
                    f"re-initialised head.cls_logits.{{weight,bias}} (3 -> 1 classes)")
    for k in weights_of(state):
        if k not in CLS:
            assert torch.equal(state[k], source[k]), k  # loaded exactly
    # pi = 0.01 prior (Sec. 4.1): bias = -log((1 - 0.01) / 0.01) = -log(99) = -4.59512
    assert_close(state["head.cls_logits.bias"], torch.full((9,), -math.log(99.0)))  # A = 9, K = 1
    weight = state["head.cls_logits.weight"]  # (A * K, C, 3, 3) = (9, 48, 3, 3): 3888 draws
    assert weight.shape == (9, 48, 3, 3) and abs(float(weight.std()) - 0.01) < 0.001
    assert float(state["num_pos_ema"]) == 100.0  # not taken from the source run (EMA_INIT)


def test_same_classes_load_everything_other_names_reinitialise(shapes_root, tmp_path):
    cfg = with_changes(tiny_config(shapes_root), model={"num_classes": 1})
    source = trained_like(cfg, seed=3)
    path = save_checkpoint({"model": source, "class_names": ["cat"]}, tmp_path / "cat.pth")
    model = build_model(cfg, pretrained=False)
    total = len(weights_of(model.state_dict()))
    assert load_init(model, path, ["cat"], 0.01) == f"init: {total}/{total} tensors from {path}"
    assert all(torch.equal(model.state_dict()[k], source[k]) for k in CLS)
    other = build_model(cfg, pretrained=False)
    line = load_init(other, path, ["dog"], 0.01)  # one class either way, but another class
    assert line.endswith("re-initialised head.cls_logits.{weight,bias} (classes ['cat'] -> ['dog'])")
    assert_close(other.head.cls_logits.bias, torch.full((9,), -math.log(99.0)))


def test_classes_matched_by_name(shapes_root, tmp_path):
    cfg3 = with_changes(tiny_config(shapes_root), model={"num_classes": 3})
    source = trained_like(cfg3, seed=8)
    path = save_checkpoint({"model": source, "class_names": ["a", "b", "c"]}, tmp_path / "abc.pth")
    model = build_model(with_changes(cfg3, model={"num_classes": 2}), pretrained=False)
    line = load_init(model, path, ["c", "x"], 0.01)
    assert line.endswith("head.cls_logits.{weight,bias}: 1 of 2 classes taken by name (c), "
                         "1 re-initialised (3 -> 2 classes)")
    # Rows are anchor-major: row a * K + k. "c" is class 2 of 3 in the checkpoint, class 0 of 2
    # here: row a * 2 + 0 <- row a * 3 + 2, for the A = 9 anchors; "x" gets the prior bias.
    weight, bias = model.head.cls_logits.weight, model.head.cls_logits.bias
    for a in range(9):
        assert torch.equal(weight[a * 2], source["head.cls_logits.weight"][a * 3 + 2])
        assert bias[a * 2] == source["head.cls_logits.bias"][a * 3 + 2]
        assert_close(bias[a * 2 + 1], torch.tensor(-math.log(99.0)))


def test_init_from_a_run_directory_takes_its_newest_checkpoint(shapes_root, tmp_path):
    # as --weights does: model_final.pth when the run finished, else the highest iteration
    cfg = with_changes(tiny_config(shapes_root), model={"num_classes": 1})
    run = tmp_path / "run"
    older, newer = trained_like(cfg, seed=6), trained_like(cfg, seed=7)
    save_checkpoint({"model": older, "class_names": ["x"]}, run / "model_0000004.pth")
    save_checkpoint({"model": newer, "class_names": ["x"]}, run / "model_0000008.pth")
    model = build_model(cfg, pretrained=False)
    line = load_init(model, run, ["x"], 0.01)
    assert line.startswith("init: ") and f" tensors from {run / 'model_0000008.pth'}" in line
    assert torch.equal(model.state_dict()["fpn.output.0.weight"], newer["fpn.output.0.weight"])
    save_checkpoint({"model": older, "class_names": ["x"]}, run / "model_final.pth")
    load_init(model, run, ["x"], 0.01)
    assert torch.equal(model.state_dict()["fpn.output.0.weight"], older["fpn.output.0.weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path / 'empty'}"):
        load_init(model, tmp_path / "empty", ["x"], 0.01)


def test_ema_weights_of_a_checkpoint_are_the_ones_loaded(shapes_root, tmp_path):
    cfg = with_changes(tiny_config(shapes_root), model={"num_classes": 1})
    raw, averaged = trained_like(cfg, seed=4), trained_like(cfg, seed=5)
    path = save_checkpoint({"model": raw, "model_ema": averaged, "ema_updates": 7, "class_names": ["x"]},
                           tmp_path / "ema.pth")
    model = build_model(cfg, pretrained=False)
    load_init(model, path, ["x"], 0.01)
    assert torch.equal(model.state_dict()["fpn.output.0.weight"], averaged["fpn.output.0.weight"])


def test_frozen_bn_and_frozen_stages_with_init(shapes_root, tmp_path, capsys):
    # backbone.weights names the pretrained architecture (FrozenBN, freeze_at 2); with model.init
    # the file is not read, so it need not exist.
    frozen = {"backbone": {"weights": str(tmp_path / "never_read.pth"), "freeze_at": 2}, "num_classes": 3}
    cfg = with_changes(tiny_config(shapes_root), model=frozen, solver={"max_iter": 1})
    source = trained_like(cfg, seed=6)
    path = save_checkpoint({"model": source, "class_names": ["circle", "square", "triangle"]},
                           tmp_path / "frozen.pth")
    model = Trainer(with_changes(cfg, model={"init": str(path)}), tmp_path / "run", device="cpu").model
    bn = "backbone.stem.1.running_mean"  # a FrozenBatchNorm2d buffer
    assert type(model.backbone.stem[1]).__name__ == "FrozenBatchNorm2d"
    assert torch.equal(model.state_dict()[bn], source[bn])
    assert not any(p.requires_grad for p in model.backbone.stem.parameters())
    assert not any(p.requires_grad for p in model.backbone.res2.parameters())
    assert all(p.requires_grad for p in model.backbone.res3.parameters())
    # The shapes set names its classes square, circle, triangle: the same three, in another
    # order, so the predictor is taken class by class (test_classes_matched_by_name).
    total = len(weights_of(model.state_dict()))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " init: " in ln]
    assert len(lines) == 1 and lines[0].endswith(
        f"init: {total - 2}/{total} tensors from {path}; head.cls_logits.{{weight,bias}}: 3 of 3 "
        f"classes taken by name (square, circle, triangle), 0 re-initialised (classes ['circle', "
        f"'square', 'triangle'] -> ['square', 'circle', 'triangle'])")


def test_resume_takes_the_runs_own_weights_not_init(shapes_root, tmp_path):
    # a run started from model.init, then resumed with the same config: the run's own weights
    cfg = with_changes(tiny_config(shapes_root), solver={"max_iter": 2, "batch_size": 2},
                       train={"eval_at_end": False})
    other = trained_like(cfg, seed=7)
    path = save_checkpoint({"model": other, "class_names": ["circle", "square", "triangle"]},
                           tmp_path / "other.pth")
    cfg = with_changes(cfg, model={"init": str(path)})
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    own = load_checkpoint(tmp_path / "run" / "model_final.pth")["model"]
    resumed = Trainer(cfg, tmp_path / "run", device="cpu", resume=True, quiet=True)
    assert all(torch.equal(resumed.model.state_dict()[k], own[k]) for k in own)
    moved = [k for k in own if own[k].is_floating_point() and not torch.equal(own[k], other[k])]
    assert moved  # two steps moved the trained weights off init: the resumed ones are not init's


def test_converted_torchvision_coco_retinanet_into_one_class(tmp_path):
    from torchvision.models.detection import retinanet_resnet50_fpn

    from retina.deploy.convert import convert_torchvision, torchvision_config

    torch.manual_seed(0)
    coco = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "tv.pth"
    convert_torchvision(coco.state_dict(), path)  # 91 slots -> the 80 COCO classes
    model = build_model(torchvision_config("v1", num_classes=1), pretrained=False)
    line = load_init(model, path, ["raccoon"], 0.01)
    total = len(weights_of(model.state_dict()))
    assert line == (f"init: {total - 2}/{total} tensors from {path}; "
                    f"re-initialised head.cls_logits.{{weight,bias}} (80 -> 1 classes)")
    torch.testing.assert_close(model.state_dict()["backbone.res5.2.conv3.weight"],
                               coco.state_dict()["backbone.body.layer4.2.conv3.weight"], rtol=0, atol=0)


def test_bad_init_files_are_one_line_errors(shapes_root, tmp_path, capsys):
    model = build_model(tiny_config(shapes_root, model={"num_classes": 3}), pretrained=False)
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {tmp_path / 'no.pth'}"):
        load_init(model, tmp_path / "no.pth", ["a"], 0.01)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as e:  # not a file of torch.save: named so
        load_init(model, junk, ["a"], 0.01)
    assert str(e.value).startswith(f"{junk} is not a checkpoint: not a file of torch.save") and "\n" not in str(e.value)
    alien = save_checkpoint({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "alien.pth")
    with pytest.raises(CheckpointError, match=f"{alien}: no tensor fits this model"):
        load_init(model, alien, ["a"], 0.01)
    argv = ["train", "--config", "shapes", "--out", str(tmp_path / "run"), "--device", "cpu",
            "--init", str(tmp_path / "no.pth"), "--set", f"data.root={shapes_root}",
            *[f"data.shapes.{k}={v}" for k, v in TINY_DATA.items()]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"retina: error: checkpoint not found: {tmp_path / 'no.pth'}"]


# ---------------------------------------------------------------------------------- EMA
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.register_buffer("count", torch.zeros(()))


def test_ema_after_two_updates_by_hand():
    model = Tiny()
    ema = build_ema(model, decay=0.9, warmup=2.0)
    with torch.no_grad():
        model.w.copy_(torch.tensor([1.0, 2.0]))  # theta_1
        model.count.fill_(5)
    ema.update_parameters(model)  # first update: a copy
    assert ema.module.w.tolist() == [1.0, 2.0] and float(ema.module.count) == 5.0
    with torch.no_grad():
        model.w.copy_(torch.tensor([3.0, 6.0]))  # theta_2
        model.count.fill_(6)
    ema.update_parameters(model)  # n = 1 earlier update
    # decay_1 = 0.9 * (1 - exp(-(1 + 1) / 2)) = 0.9 * (1 - 0.3678794) = 0.5689085
    # ema = 0.5689085 * [1, 2] + 0.4310915 * [3, 6] = [1.8621830, 3.7243660]
    assert_close(ema.module.w, torch.tensor([1.8621830, 3.7243660]))
    assert float(ema.module.count) == 6.0  # buffers copied, not averaged
    assert int(ema.n_averaged) == 2
    # decay_n reaches (1 - 1/e) of decay at n + 1 = warmup: 0.9998 * 0.6321206 = 0.6319942
    assert_close(ema_decay(0.9998, 2000.0, 1999), 0.6319942, rtol=0, atol=1e-7)


def test_ema_state_round_trip_is_exact():
    model = Tiny()
    ema = build_ema(model, 0.9, 2.0)
    for value in (1.0, 4.0, 2.0):
        with torch.no_grad():
            model.w.fill_(value)
        ema.update_parameters(model)
    state = ema_state(ema)
    assert state["ema_updates"] == 3 and set(state["model_ema"]) == {"w", "count"}
    other = build_ema(Tiny(), 0.9, 2.0)
    load_ema_state(other, state)
    assert torch.equal(other.module.w, ema.module.w) and int(other.n_averaged) == 3


def test_trainer_evaluates_checkpoints_and_deploys_the_ema(shapes_root, tmp_path, monkeypatch):
    seen = []

    def fake_validate(self, model, iteration, out_dir=None, weights=""):
        seen.append((model, iteration, weights))
        return {"AP": float(iteration)}

    monkeypatch.setattr(Validator, "__call__", fake_validate)
    cfg = with_changes(tiny_config(shapes_root), solver={"max_iter": 3, "batch_size": 2},
                       train={"eval_period": 2, "ema": {"enabled": True, "decay": 0.9, "warmup": 1.0}})
    trainer = Trainer(cfg, tmp_path / "run", device="cpu", quiet=True)
    trainer.train()
    assert [(m is trainer.state.ema.module, i, w) for m, i, w in seen] == [(True, 2, "EMA weights"),
                                                                          (True, 3, "EMA weights")]
    final = load_checkpoint(tmp_path / "run" / "model_final.pth")
    assert final["ema_updates"] == 3 and set(final["model_ema"]) == set(final["model"])
    assert any(not torch.equal(final["model_ema"][k], final["model"][k]) for k in final["model"])
    best = load_checkpoint(tmp_path / "run" / "model_best.pth")
    assert best["ema_updates"] == 2
    deployed, *_ = load_model(tmp_path / "run" / "model_final.pth")
    assert all(torch.equal(v, final["model_ema"][k]) for k, v in deployed.state_dict().items())
