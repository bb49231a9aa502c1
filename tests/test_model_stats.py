"""`retina analyze model`: parameter counts and FLOPs checked against hand-derived values.

The tiny config (tests/tinyrun.py): ResNet-18, FPN width C = 48 on P3..P5, one head conv with
GroupNorm per tower, A = 3 scales x 3 ratios = 9 anchors per position, K = 3 classes, input
64 x 64 (padded to a multiple of 32: still 64 x 64). Feature maps: P3 8 x 8, P4 4 x 4, P5 2 x 2
-> 64 + 16 + 4 = 84 positions per image.
"""

from __future__ import annotations

import json

import pytest

from retina.cli import main
from retina.config import dump_config
from retina.studies.model_stats import count_flops, count_parameters, model_for_counting
from tinyrun import tiny_config, with_changes

C, A, K = 48, 9, 3
POSITIONS = 8 * 8 + 4 * 4 + 2 * 2  # 84


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("unused"), model={"num_classes": K})
    return cfg, model_for_counting(cfg)


@pytest.fixture(scope="module")
def tiny_flops(tiny):
    _, model = tiny
    model.train()
    flops = count_flops(model, (64, 64))
    assert model.training  # counted in eval mode, then the mode is restored
    return flops


def test_head_parameters_by_hand(tiny):
    _, model = tiny
    # cls_logits: a 3x3 conv C -> A*K with bias: (C * 9 + 1) * A * K = 433 * 27 = 11691
    assert sum(p.numel() for p in model.head.cls_logits.parameters()) == (C * 9 + 1) * A * K == 11691
    # head = 2 towers of (3x3 conv C -> C with bias, GroupNorm weight + bias)
    #        + cls_logits + box_deltas (C -> 4A): 2 * (48*48*9 + 48 + 2*48) + 11691 + 433*36
    tower = C * C * 9 + C + 2 * C  # 20880
    expected_head = 2 * tower + (C * 9 + 1) * A * K + (C * 9 + 1) * A * 4  # 41760 + 11691 + 15588
    counts = count_parameters(model)
    assert counts["by_module"]["head"] == {"total": expected_head, "trainable": expected_head}
    assert expected_head == 69039
    assert counts["total"] == sum(m["total"] for m in counts["by_module"].values())
    assert counts["trainable"] == counts["total"]  # random init: nothing frozen


def test_flops_of_known_convs_by_hand(tiny_flops):
    flops = tiny_flops
    # FlopCounterMode: 2 FLOPs per multiply-add; a conv costs 2 * Cin * Cout * k * k * H_out * W_out.
    # cls_logits runs once per level: 2 * 48 * 27 * 9 * 84 = 1,959,552
    assert flops["head.cls_logits"] == 2 * C * (A * K) * 3 * 3 * POSITIONS == 1_959_552
    # The stem's 7x7 stride-2 conv, 3 -> 64 channels, 64x64 -> 32x32: 2 * 3 * 64 * 49 * 1024
    assert flops["backbone.stem.0"] == 2 * 3 * 64 * 7 * 7 * 32 * 32 == 19_267_584
    # Convolutions are all the counted work: the three top-level modules add up to the total.
    assert flops["total"] == flops["backbone"] + flops["fpn"] + flops["head"]


def test_flops_are_counted_after_the_models_resize(tiny, tiny_flops):
    _, model = tiny
    # The model resizes any image to its input size (shorter side 64, longer <= 64) before the
    # backbone, as in inference: a 128 x 128 image costs what a 64 x 64 one does.
    assert count_flops(model, (128, 128)) == tiny_flops


def test_pretrained_config_counts_frozen_stages(tiny):
    cfg, random_init = tiny
    # A pretrained backbone (never loaded for counting) brings FrozenBatchNorm, whose affine
    # values are buffers, and freezes the stem and res2 (freeze_at = 2).
    pretrained_cfg = with_changes(cfg, model={"backbone": {"weights": "missing-on-purpose.pth"}})
    pretrained = model_for_counting(pretrained_cfg)
    counts = count_parameters(pretrained)
    # ResNet-18's BatchNorm channels: stem 64; res2 4 x 64; res3 4 x 128 + 128 (downsample);
    # res4 4 x 256 + 256; res5 4 x 512 + 512 -> 4800 channels, 2 parameters each, which
    # FrozenBatchNorm keeps as buffers.
    bn = 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)
    assert bn == 9600
    random_backbone = count_parameters(random_init)["by_module"]["backbone"]["total"]
    assert counts["by_module"]["backbone"]["total"] == random_backbone - bn
    # Frozen: stem conv 3 * 64 * 7 * 7 = 9408, res2 = 2 blocks x 2 convs of 64 * 64 * 9 = 147456
    assert counts["total"] - counts["trainable"] == 3 * 64 * 49 + 4 * 64 * 64 * 9 == 156_864


def test_cli_analyze_model(tiny, tiny_flops, tmp_path, capsys):
    cfg, model = tiny
    config_file = tmp_path / "tiny.yaml"
    dump_config(cfg, config_file)
    out = tmp_path / "stats.json"
    assert main(["analyze", "model", "--config", str(config_file), "--json", str(out), "--device", "cpu"]) == 0
    stats = json.loads(out.read_text())
    assert stats["params"]["total"] == count_parameters(model)["total"]
    assert stats["flops"]["total"] == tiny_flops["total"]
    assert stats["flops"]["by_module"] == {m: tiny_flops[m] for m in ("backbone", "fpn", "head")}
    assert stats["input_size"] == [64, 64] and stats["padded_size"] == [64, 64]
    assert stats["gflops"] == pytest.approx(2 * stats["gmacs"]) == pytest.approx(tiny_flops["total"] / 1e9)
    printed = capsys.readouterr().out
    assert "FLOPs at 64x64" in printed and "head" in printed
    assert stats["num_classes"] == 3 and "the train set's" in stats["classes_from"]
    # a shorter side above the cap: the model scales the dummy 128 x 64 image down to 64 x 32
    assert main(["analyze", "model", "--config", str(config_file), "--json", str(out), "--device", "cpu",
                 "--set", "model.input.test_min_size=128", "model.input.test_max_size=64"]) == 0
    stats = json.loads(out.read_text())
    assert stats["input_size"] == [64, 32] and stats["flops"]["total"] < tiny_flops["total"]
    # the bundled shapes config leaves model.num_classes null: training makes it the set's 3
    capsys.readouterr()
    assert main(["analyze", "model", "--config", "shapes", "--json", str(out), "--device", "cpu"]) == 0
    assert json.loads(out.read_text())["num_classes"] == 3
    assert "classes: 3 (the train set's, as training sets model.num_classes)" in capsys.readouterr().out
    # data that is not there: model.num_classes, said so
    assert main(["analyze", "model", "--config", "photos_cpu_mobilenet", "--json", str(out), "--device", "cpu",
                 "--set", f"data.root={tmp_path / 'none'}", "model.num_classes=7"]) == 0
    assert json.loads(out.read_text())["num_classes"] == 7
    assert f"classes: 7 (model.num_classes; the data at data.root={tmp_path / 'none'} could not be read)" \
        in capsys.readouterr().out
    assert main(["analyze", "model"]) == 2  # neither --config nor --weights
    assert "--config" in capsys.readouterr().err
