"""Loading a checkpoint never runs code (``torch.load(weights_only=True)``), old checkpoints of
this project still load, and building a model to load a checkpoint into reads no pretrained
weights."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from retina.cli import main
from retina.config import config_from_dict, config_to_dict
from retina.engine.checkpoint import (CheckpointError, UnsafeCheckpointError, load_checkpoint,
                                      load_model, rng_state, save_checkpoint, set_rng_state)
from retina.model import build_model
from retina.model.backbone import WeightsError
from tinyrun import merge, tiny_config


class CreatesFile:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, which creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a retina checkpoint whose ``model`` entry runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": CreatesFile(marker), "iteration": 10, "config": {}}, path)
    return path


def one_error_line(err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("retina: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def tiny_checkpoint(tiny_shapes, tiny_shapes_overrides, tmp_path) -> Path:
    """An untrained tiny model saved as a retina checkpoint: frozen BN and no pretrained weights."""
    cfg = config_from_dict(merge(config_to_dict(tiny_config(tiny_shapes)), {
        "model": {"num_classes": 3, "backbone": {"norm": "frozen_bn"}}}), tiny_shapes_overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    path = tmp_path / "run" / "model_final.pth"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "iteration": 0,
                     "class_names": ["square", "circle", "triangle"], "cat_ids": [1, 2, 3]}, path)
    return path


# ------------------------------------------------------------------------ malicious files
def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    # The test's premise: the file below really runs code when loaded the old way.
    marker = tmp_path / "ran"
    torch.load(malicious_checkpoint(tmp_path / "evil.pth", marker), weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_a_malicious_file(tmp_path):
    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "evil.pth", marker)
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}: not a retina checkpoint or unsafe")
    assert "open" in message  # names what it would have called
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"hello\n", b"model:\n  fpn: {channels: 128}\n", b"\xff\xd8\xff\xe0"])
def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path, content):
    # text, a run's config.yaml, a JPEG: not "unsafe" nor a KeyError from the unpickler
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"^{path} is not a checkpoint: not a file of torch.save "):
        load_checkpoint(path)
    torch.save({"model": {}}, path)  # the same path, written by torch.save, loads
    assert load_checkpoint(path) == {"model": {}}


def test_eval_refuses_a_malicious_checkpoint(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "run" / "model_final.pth", marker)
    assert main(["eval", "--weights", str(path), "--device", "cpu"]) == 2
    one_error_line(capsys.readouterr().err, str(path), "unsafe to load (weights_only)")
    assert not marker.exists()


def test_predict_refuses_a_malicious_checkpoint(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = malicious_checkpoint(tmp_path / "run" / "model_final.pth", marker)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code = main(["predict", "--weights", str(path), "--input", str(image), "--device", "cpu",
                 "--out", str(tmp_path / "pred")])
    assert code == 2
    one_error_line(capsys.readouterr().err, str(path), "unsafe to load (weights_only)")
    assert not marker.exists() and not (tmp_path / "pred").exists()


@pytest.mark.parametrize("name", ["model_final.pth", "model_0000010.pth"])
def test_resume_refuses_a_malicious_checkpoint(tmp_path, capsys, name, tiny_shapes_overrides):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    path = malicious_checkpoint(run / name, marker)
    code = main(["train", "--resume", "--out", str(run), "--device", "cpu",
                 "--set", *tiny_shapes_overrides])
    assert code == 2
    # Refused outright: not skipped in favour of an older checkpoint as a truncated one would be.
    one_error_line(capsys.readouterr().err, str(path), "unsafe to load (weights_only)")
    assert not marker.exists()
    assert sorted(p.name for p in run.iterdir()) == [name]  # nothing else written


def test_a_damaged_checkpoint_is_one_line_not_unsafe(tmp_path):
    path = tmp_path / "model_final.pth"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    path.write_bytes(path.read_bytes()[:200])  # truncated: a disk fault, not an attack
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert not isinstance(e.value, UnsafeCheckpointError)
    assert str(e.value).startswith(f"cannot read checkpoint {path}") and "\n" not in str(e.value)


# --------------------------------------------------------------------------- the format
def test_checkpoints_hold_only_tensors_and_plain_values(tmp_path):
    path = save_checkpoint({"model": {"w": torch.ones(2)}, "rng": rng_state(), "config": {"a": [1]}},
                           tmp_path / "c.pth")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached Gaussian (has_gauss=1) in NumPy's state
    path = save_checkpoint({"model": {}, "rng": rng_state()}, tmp_path / "c.pth")
    expected = draws()
    draws()  # move every RNG on
    set_rng_state(load_checkpoint(path)["rng"])
    assert draws() == expected


def test_old_checkpoints_with_numpy_rng_arrays_still_load(tmp_path):
    # Written as before RNG states were tensors: NumPy's state is a tuple holding an ndarray,
    # python's a tuple; torch.load(weights_only=True) alone refuses the ndarray.
    np.random.seed(5)
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    path = tmp_path / "model_0000100.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 100, "rng": old_rng}, path)
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) >= {"numpy.ndarray"}
    expected = draws()
    ckpt = load_checkpoint(path)
    assert ckpt["iteration"] == 100
    set_rng_state(ckpt["rng"])
    assert draws() == expected


def test_numpy_arrays_do_not_open_the_door_to_other_objects(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "c.pth"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}, "x": CreatesFile(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="unsafe to load"):
        load_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------- no pretrained weights
def test_build_model_without_pretrained_reads_no_weights(monkeypatch):
    def no_download(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", no_download)
    cfg = config_from_dict({"model": {"num_classes": 3, "backbone": {
        "depth": 18, "weights": "ResNet18_Weights.IMAGENET1K_V1", "freeze_at": 2}}})
    with pytest.raises(WeightsError, match="cannot download"):
        build_model(cfg)  # the training path does fetch them
    model = build_model(cfg, pretrained=False)
    # Same architecture as with the weights: FrozenBatchNorm (norm auto), stem + res2 frozen.
    backbone = model.backbone
    assert isinstance(backbone.stem[1], torchvision.ops.FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in backbone.res2.parameters())
    assert all(p.requires_grad for p in backbone.res3.parameters())


def test_eval_and_predict_from_a_checkpoint_whose_config_names_missing_weights(
        tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "no" / "resnet18.pth"
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["config"]["model"]["backbone"]["weights"] = str(missing)  # as a training config would
    save_checkpoint(ckpt, tiny_checkpoint)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(ckpt["config"]))

    model, cfg, _, _ = load_model(tiny_checkpoint)
    assert cfg.model.backbone.weights == str(missing)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ckpt["model"][name], rtol=0, atol=0, msg=name)

    out = tmp_path / "eval"
    assert main(["eval", "--weights", str(tiny_checkpoint), "--config", str(config), "--device", "cpu",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "metrics.json").is_file()
    image = tmp_path / "a.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    pred = tmp_path / "pred"
    assert main(["predict", "--weights", str(tiny_checkpoint), "--input", str(image), "--device", "cpu",
                 "--out", str(pred)]) == 0, capsys.readouterr().err
    assert (pred / "detections.json").is_file()
    assert not missing.exists()


def test_eval_without_out_keeps_an_earlier_evaluation(tiny_checkpoint, capsys):
    # the default <run>/eval, then eval2 for a second evaluation (here with another score
    # threshold): the first one's files are kept as they were
    run = tiny_checkpoint.parent
    assert main(["eval", "--weights", str(run), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert f"metrics: {run / 'eval' / 'metrics.json'}" in capsys.readouterr().out
    first = (run / "eval" / "metrics.json").read_text()
    assert main(["eval", "--weights", str(tiny_checkpoint), "--device", "cpu",
                 "--set", "model.inference.score_thresh=0.5"]) == 0, capsys.readouterr().err
    assert f"metrics: {run / 'eval2' / 'metrics.json'}" in capsys.readouterr().out
    assert (run / "eval" / "metrics.json").read_text() == first
    assert (run / "eval2" / "detections.json").is_file()


@pytest.mark.parametrize("loss_type", ["ce", "ohem"])
def test_checkpoints_of_ce_and_ohem_runs_from_before_the_rule_load_with_gamma_0(
        tiny_checkpoint, loss_type):
    # Before `loss.type=ce|ohem` with gamma != 0 became a config error, such runs stored the
    # default gamma 2.0 and the loss trained them with gamma 0; they load with what they trained.
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["config"]["loss"].update({"type": loss_type, "gamma": 2.0, "alpha": None})
    save_checkpoint(ckpt, tiny_checkpoint)
    _, cfg, _, _ = load_model(tiny_checkpoint)
    assert (cfg.loss.type, cfg.loss.gamma) == (loss_type, 0.0)
