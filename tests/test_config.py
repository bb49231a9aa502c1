"""Tests for retina.config: base files, dotted overrides, type/choice/range errors (one line each),
YAML errors, missing files, round trip, and keys the chosen variant does not read (refused when
written beside the choice, dropped with a notice when a more specific source made it)."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
import yaml

from retina.config import (CONFIG_DIR, Config, ConfigError, config_from_dict, config_to_dict,
                           dump_config, flat_keys, get_key, key_applies, load_config, replace,
                           show_notices)
from retina.errors import RetinaError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    """The message of the ConfigError raised by load_config(*args); always one line."""
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.loss.gamma == 2.0 and cfg.loss.alpha == 0.25
    assert cfg.model.anchors.scales == (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    assert cfg.model.box_coder.scale_clamp == math.log(1000.0 / 16)


def test_base_file_and_overrides(tmp_path: Path):
    write(tmp_path / "base.yaml", "model:\n  num_classes: 5\n  fpn:\n    channels: 64\nloss:\n  gamma: 1.5\n")
    (tmp_path / "exp").mkdir()
    child = write(tmp_path / "exp" / "child.yaml",
                  "base: ../base.yaml\nmodel:\n  fpn:\n    min_level: 4\nloss:\n  alpha: 0.5\n")
    cfg = load_config(child)
    # the child's keys override the base's; sibling keys of the base survive the merge
    assert cfg.model.num_classes == 5
    assert cfg.model.fpn.channels == 64 and cfg.model.fpn.min_level == 4
    assert cfg.loss.gamma == 1.5 and cfg.loss.alpha == 0.5
    # overrides beat both files; values are YAML
    cfg = load_config(child, ["loss.gamma=0", "loss.alpha=null", "model.input.min_size=[640,672]",
                              "model.fpn.p6_from=p5", "model.matcher.allow_low_quality=false"])
    assert cfg.loss.gamma == 0.0 and isinstance(cfg.loss.gamma, float)
    assert cfg.loss.alpha is None
    assert cfg.model.input.min_size == (640, 672)
    assert cfg.model.fpn.p6_from == "p5"
    assert cfg.model.matcher.allow_low_quality is False
    assert cfg.model.num_classes == 5  # untouched


def test_scalar_where_tuple_expected():
    cfg = load_config(None, ["model.input.min_size=512"])
    assert cfg.model.input.min_size == (512,)


def test_overrides_leave_the_callers_dict_as_it_was():
    # a checkpoint's or an exported file's config dict was edited in place by --set, so comparing
    # it with the result (`config_changes`) found nothing
    data = {"loss": {"gamma": 2.0}, "model": {"inference": {"score_thresh": 0.05}}}
    cfg = config_from_dict(data, ["loss.gamma=0", "model.inference.score_thresh=0.5"])
    assert (cfg.loss.gamma, cfg.model.inference.score_thresh) == (0.0, 0.5)
    assert data == {"loss": {"gamma": 2.0}, "model": {"inference": {"score_thresh": 0.05}}}


def test_comma_separated_list_where_tuple_expected():
    # `data.classes=cat,dog` was one class named 'cat,dog'; items keep their text for a list of
    # names (a class "1" or "off" stays a string) and are YAML scalars for numbers
    cfg = load_config(None, ["data.classes=cat, dog,1,off", "model.input.min_size=224,256",
                             "data.augment.scale_jitter=0.75,1.25"])  # fmt: skip
    assert cfg.data.classes == ("cat", "dog", "1", "off")
    assert cfg.model.input.min_size == (224, 256)
    assert cfg.data.augment.scale_jitter == (0.75, 1.25)
    assert config_error(None, ["model.input.min_size=224,big"]).endswith("model.input.min_size='big' should be int")
    assert load_config(None, ["data.classes=[a,b]"]).data.classes == ("a", "b")  # the YAML list as before


def test_yaml_1_1_pitfalls_in_overrides_and_files(tmp_path: Path):
    # `off` must stay a string for a Literal choice; 1e-4 must be a float (PyYAML's YAML 1.1
    # rules read them as False and as the string '1e-4')
    cfg = load_config(None, ["train.amp=off", "solver.weight_decay=1e-4", "solver.lr=2E-3"])
    assert cfg.train.amp == "off"
    assert cfg.solver.weight_decay == 1e-4 and cfg.solver.lr == 2e-3
    path = write(tmp_path / "c.yaml", "train:\n  amp: off\nsolver:\n  weight_decay: 5e-5\n  lr: .02\n")
    cfg = load_config(path)
    assert cfg.train.amp == "off" and cfg.solver.weight_decay == 5e-5 and cfg.solver.lr == 0.02


def test_unknown_key_did_you_mean(tmp_path: Path):
    msg = config_error(None, ["loss.gama=1"])
    assert "unknown key 'loss.gama'" in msg and "did you mean 'gamma'" in msg
    path = write(tmp_path / "c.yaml", "modle:\n  num_classes: 3\n")
    msg = config_error(path)
    assert str(path) in msg and "unknown key 'modle'" in msg and "did you mean 'model'" in msg
    msg = config_error(None, ["model.fpn.chanels=3"])
    assert "model.fpn.chanels" in msg and "did you mean 'channels'" in msg


def test_wrong_type():
    msg = config_error(None, ["model.num_classes=three"])
    assert "model.num_classes='three'" in msg and "should be int" in msg
    msg = config_error(None, ["model.num_classes=2.5"])
    assert "should be int" in msg
    msg = config_error(None, ["model.matcher.allow_low_quality=1"])
    assert "should be bool" in msg
    msg = config_error(None, ["model.box_coder.weights=[1,2,3]"])
    assert "should have 4 values" in msg
    msg = config_error(None, ["model=3"])
    assert "model should be a mapping" in msg


def test_literal_choice():
    msg = config_error(None, ["loss.type=focall"])
    assert "loss.type='focall'" in msg and "should be one of ['focal', 'ce', 'ohem', 'focal_star', 'quality_focal']" in msg
    msg = config_error(None, ["model.backbone.depth=42"])
    assert "should be one of [18, 34, 50, 101]" in msg
    assert load_config(None, ["model.backbone.depth=18"]).model.backbone.depth == 18
    # equal is not enough: 50.0 and true are not valid depths
    assert "should be one of" in config_error(None, ["model.backbone.depth=50.0"])
    assert "should be one of" in config_error(None, ["model.backbone.depth=true"])


def test_range_errors():
    msg = config_error(None, ["loss.gamma=-1"])
    assert "loss.gamma=-1.0" in msg and "must be >= 0" in msg
    assert "must be in [0, 1]" in config_error(None, ["loss.alpha=1.5"])
    assert "model.fpn.max_level" in config_error(None, ["model.fpn.max_level=2"])
    assert "model.anchors.sizes" in config_error(None, ["model.anchors.sizes=[32, 64]"])
    assert "model.matcher.bg_iou_thresh" in config_error(None, ["model.matcher.bg_iou_thresh=0.6"])
    # the generated set's own limits, named before any drawing starts
    assert config_error(None, ["data.dataset=shapes", "data.shapes.image_size=8"]) == (
        "--set data.shapes.image_size=8: data.shapes.image_size=8 must be >= 16")
    assert config_error(None, ["data.dataset=dense", "data.dense.num_classes=81"]) == (
        "--set data.dense.num_classes=81: data.dense.num_classes=81 must be in 1..80 (colour x shape)")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path):
    path = write(tmp_path / "bad.yaml", "loss:\n  gamma: 1.0\n  alpha: [0.25\nmodel:\n  num_classes: 3\n")
    msg = config_error(path)
    assert str(path) in msg and "YAML syntax error" in msg
    assert "line " in msg
    line = int(msg.split("line ")[1].split()[0])
    assert 3 <= line <= 5  # the unclosed bracket opens on line 3; the parser notices by line 5


def test_bad_override_syntax():
    msg = config_error(None, ["loss.gamma"])
    assert "expected key=value" in msg


def test_missing_file_and_missing_base(tmp_path: Path):
    msg = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg
    child = write(tmp_path / "child.yaml", "base: gone.yaml\nloss:\n  gamma: 1.0\n")
    msg = config_error(child)
    assert str(child) in msg and "base file 'gone.yaml' not found" in msg


def test_base_may_name_a_bundled_config(tmp_path: Path):
    # a user's own file on top of a shipped recipe, by name as --config takes it
    for base in ("photos_cpu_mobilenet", "photos_cpu_mobilenet.yaml"):
        child = write(tmp_path / "mine.yaml", f"base: {base}\nsolver:\n  max_minutes: 5\n")
        cfg = load_config(child)
        assert cfg.model.backbone.type == "mobilenet_v3_small" and cfg.model.backbone.depth == 50  # the base's
        assert cfg.model.fpn.channels == 128 and cfg.solver.max_minutes == 5  # its base's base; the file
    # a file beside it comes first
    write(tmp_path / "photos_cpu.yaml", "solver:\n  lr: 0.5\n")
    assert load_config(write(tmp_path / "mine.yaml", "base: photos_cpu.yaml\n")).solver.lr == 0.5


def test_base_cycle_is_a_config_error(tmp_path: Path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    assert "base" in config_error(tmp_path / "a.yaml")


def test_top_level_not_mapping(tmp_path: Path):
    assert "mapping" in config_error(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()


def test_round_trip(tmp_path: Path):
    cfg = load_config(None, ["loss.alpha=null", "model.input.min_size=[640,672]", "train.amp=bf16",
                             "model.backbone.weights=ResNet50_Weights.IMAGENET1K_V1"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    dump_config(cfg, tmp_path / "dump.yaml")
    assert load_config(tmp_path / "dump.yaml") == cfg
    off = load_config(None, ["train.amp=off"])
    dump_config(off, tmp_path / "off.yaml")
    assert load_config(tmp_path / "off.yaml") == off


def test_frozen_and_replace():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.loss.gamma = 1.0  # type: ignore[misc]
    new = replace(cfg, model=dataclasses.replace(cfg.model, num_classes=3))
    assert new.model.num_classes == 3 and cfg.model.num_classes is None  # null: from the data
    with pytest.raises(ConfigError, match="model.num_classes"):
        replace(cfg, model=dataclasses.replace(cfg.model, num_classes=0))


def test_every_error_is_one_line(tmp_path: Path):
    bad = [
        (None, ["loss.gama=1"]), (None, ["loss.gamma=x"]), (None, ["loss.type=x"]),
        (None, ["loss.gamma=-1"]), (None, ["nope"]), (None, ["model.fpn=1"]),
        (None, ["model.input.min_size={a: 1}"]), (None, ["loss.gamma=[1,\n2]"]),
        (write(tmp_path / "x.yaml", "a: [\n"), []), (tmp_path / "missing.yaml", []),
        (write(tmp_path / "s.yaml", 'data:\n  root: {"x\\ny": 1}\n'), []),
    ]
    for path, overrides in bad:
        config_error(path, overrides)  # asserts no newline


# ------------------------------------------------------------------------ where a value came from
def test_range_error_names_the_set_item_not_the_file(tmp_path: Path):
    path = write(tmp_path / "c.yaml", "solver:\n  lr: 0.02\n")
    msg = config_error(path, ["solver.lr=-1"])
    assert msg == "--set solver.lr=-1: solver.lr=-1.0 must be > 0"
    # a value from the file names the file and the key
    path = write(tmp_path / "bad.yaml", "solver:\n  lr: -0.5\n")
    assert config_error(path) == f"{path}: solver.lr=-0.5 must be > 0"


def test_error_names_the_base_file_that_set_the_value(tmp_path: Path):
    base = write(tmp_path / "base.yaml", "solver:\n  lr: -0.5\n  momentum: zero\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nsolver:\n  max_iter: 5\n")
    msg = config_error(child)  # the type error of the base's value
    assert msg.startswith(f"{base.resolve()}: solver.momentum='zero' should be float")
    write(base, "solver:\n  lr: -0.5\n")
    assert config_error(child) == f"{base.resolve()}: solver.lr=-0.5 must be > 0"
    # the child overriding the base's value is the one to blame
    write(child, "base: base.yaml\nsolver:\n  lr: -2\n")
    assert config_error(child) == f"{child}: solver.lr=-2.0 must be > 0"


def test_relation_error_blames_the_key_set_last(tmp_path: Path):
    # max_level 7 (default) is fine until --set raises min_level above it
    msg = config_error(None, ["model.fpn.max_level=4", "model.fpn.min_level=5"])
    assert msg.startswith("--set model.fpn.min_level=5: model.fpn.max_level=4 must be in min_level..8")


# ---------------------------------------------------------------- settings that do not apply
def test_gamma_does_not_apply_to_ce_or_ohem():
    msg = config_error(None, ["loss.type=ce", "loss.gamma=2"])
    assert msg == ("--set loss.gamma=2: loss.gamma=2.0 does not apply to loss.type=ce "
                   "(alpha-balanced CE has gamma 0); set loss.gamma=0 or use loss.type=focal")
    assert "loss.gamma=1.0 does not apply to loss.type=ohem" in config_error(None, ["loss.type=ohem", "loss.gamma=1"])
    # gamma 0 is what CE and OHEM train with: accepted
    assert load_config(None, ["loss.type=ce", "loss.gamma=0"]).loss.type == "ce"
    assert load_config(None, ["loss.type=ohem", "loss.gamma=0"]).loss.type == "ohem"
    # the schema's gamma 2.0 is FL's: CE and OHEM chosen alone train with their gamma 0
    assert load_config(None, ["loss.type=ce"]).loss.gamma == 0.0
    assert load_config(None, ["loss.type=ohem"]).loss.gamma == 0.0


def test_every_key_of_a_choice_that_does_not_apply_is_named_at_once():
    # evaluating a shapes run on COCO json took one error per leftover data.shapes key
    msg = config_error(None, ["data.shapes.num_train=64", "data.shapes.image_size=128", "data.dataset=coco"])
    assert msg == ("--set data.dataset=coco: data.shapes.num_train=64 and data.shapes.image_size=128 do not "
                   "apply to data.dataset=coco (read only by the generated shapes set); set "
                   "data.shapes.num_train=2000 data.shapes.image_size=160 or use data.dataset=shapes")


def test_focal_star_reads_its_own_gamma():
    msg = config_error(None, ["loss.type=focal_star", "loss.gamma=1"])
    assert msg == ("--set loss.gamma=1: loss.gamma=1.0 does not apply to loss.type=focal_star "
                   "(FL* reads loss.focal_star.gamma); set loss.gamma=2 or use loss.type=focal")
    cfg = load_config(None, ["loss.type=focal_star", "loss.focal_star.gamma=4"])
    assert cfg.loss.focal_star.gamma == 4.0


def test_quality_focal_has_no_alpha():
    msg = config_error(None, ["loss.type=quality_focal", "loss.alpha=0.5"])
    assert msg == ("--set loss.alpha=0.5: loss.alpha=0.5 does not apply to "
                   "loss.type=quality_focal (GFL's QFL weights positives by their IoU, not by alpha); "
                   "set loss.alpha=null or use loss.type=focal")
    cfg = load_config(None, ["loss.type=quality_focal", "loss.alpha=null", "loss.gamma=1.5"])
    assert (cfg.loss.type, cfg.loss.alpha, cfg.loss.gamma) == ("quality_focal", None, 1.5)
    assert load_config(None, ["loss.type=quality_focal"]).loss.alpha is None  # the schema's 0.25: FL's


def test_variant_settings_need_their_variant(tmp_path: Path):
    msg = config_error(None, ["loss.ohem.batch_size=256"])
    assert msg == ("--set loss.ohem.batch_size=256: loss.ohem.batch_size=256 does not apply to "
                   "loss.type=focal (read only by OHEM); set loss.ohem.batch_size=128 or use loss.type=ohem")
    assert "loss.focal_star.beta=0.0 does not apply to loss.type=focal" in config_error(
        None, ["loss.focal_star.beta=0"])
    assert "use loss.normalizer=ema" in config_error(None, ["loss.ema_momentum=0.99"])
    assert "use loss.box_loss=smooth_l1" in config_error(None, ["loss.box_loss=l1", "loss.smooth_l1_beta=0.2"])
    assert "use solver.schedule=step" in config_error(None, ["solver.schedule=cosine", "solver.steps=[5]"])
    assert "use solver.optimizer=sgd" in config_error(None, ["solver.optimizer=adamw", "solver.momentum=0.5"])
    assert "use data.on_bad_image=skip" in config_error(None, ["data.max_bad_fraction=0.5"])
    assert "use data.dataset=shapes" in config_error(None, ["data.shapes.num_train=5"])
    assert "use data.dataset=dense" in config_error(None, ["data.dense.num_classes=12"])
    assert "use data.dataset=coco" in config_error(None, ["data.dataset=shapes", "data.val_ann=x.json"])
    assert config_error(None, ["model.backbone.freeze_at=0"]) == (
        "--set model.backbone.freeze_at=0: model.backbone.freeze_at=0 does not apply to "
        "model.backbone.weights=null and model.init=null (only pretrained stages are frozen); set "
        "model.backbone.freeze_at=2 or set model.backbone.weights or model.init (--init)")
    # a file names itself; the choice it made is in the message
    path = write(tmp_path / "c.yaml", "loss:\n  type: ohem\n  gamma: 0\n  focal_star: {beta: 0}\n")
    assert config_error(path).startswith(f"{path}: loss.focal_star.beta=0.0 does not apply to loss.type=ohem")
    # the variant's own keys are accepted with it
    cfg = load_config(None, ["loss.type=ohem", "loss.gamma=0", "loss.ohem.batch_size=256",
                             "loss.normalizer=ema", "loss.ema_momentum=0.99"])
    assert cfg.loss.ohem.batch_size == 256 and cfg.loss.ema_momentum == 0.99


def test_key_applies():
    ohem = load_config(None, ["loss.type=ohem", "loss.gamma=0"])
    focal = load_config()
    assert not key_applies("loss.gamma", ohem) and key_applies("loss.gamma", focal)
    assert key_applies("loss.ohem.batch_size", ohem) and not key_applies("loss.ohem.batch_size", focal)
    assert key_applies("loss.ohem", ohem)  # a section
    assert not key_applies("loss.focal_star.gamma", ohem)
    assert key_applies("loss.alpha", ohem) and key_applies("model.fpn.channels", ohem)  # ungated
    assert not key_applies("solver.steps", load_config(None, ["solver.schedule=cosine"]))


# ------------------------------------------------------------------ explicit beats inherited
def notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "retina.config"]


@pytest.mark.parametrize("overrides, notice, effective", [
    # on shapes_r18.yaml (ResNet-18, focal loss): its image_size 128 -> ShapesConfig's 160; its
    # other shapes keys are the defaults
    (["data.dataset=coco", "data.root=my_photos"], "data.shapes.* not read with data.dataset=coco: ignored",
     {"data.dataset": "coco", "data.root": "my_photos", "data.shapes.image_size": 160}),
    # depth 18 -> BackboneConfig's 50
    (["model.backbone.type=mobilenet_v3_small"],
     "model.backbone.depth not read with model.backbone.type=mobilenet_v3_small: ignored",
     {"model.backbone.type": "mobilenet_v3_small", "model.backbone.depth": 50}),
    # gamma 2.0 -> 0: alpha-balanced CE is FL with gamma 0 (Table 1a); alpha 0.25 is read by CE
    (["loss.type=ce"], "loss.gamma not read with loss.type=ce: ignored",
     {"loss.type": "ce", "loss.gamma": 0.0, "loss.alpha": 0.25}),
])  # fmt: skip
def test_a_value_the_override_stops_reading_is_dropped(overrides, notice, effective, caplog, tmp_path: Path):
    with caplog.at_level(logging.WARNING, logger="retina.config"):
        cfg = load_config("shapes_r18", overrides)
    assert notices(caplog) == [notice]
    assert {k: get_key(cfg, k) for k in effective} == effective
    assert cfg.model.fpn.channels == 96 and cfg.solver.lr == 0.02  # the rest of shapes_r18.yaml
    dump_config(cfg, tmp_path / "config.yaml")  # what a run writes: the effective values
    dumped = flat_keys(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert {k: dumped[k] for k in effective} == effective


def test_a_value_written_beside_its_choice_is_refused(tmp_path: Path):
    assert config_error("shapes", ["loss.type=ce", "loss.gamma=2"]) == (
        "--set loss.gamma=2: loss.gamma=2.0 does not apply to loss.type=ce (alpha-balanced CE has "
        "gamma 0); set loss.gamma=0 or use loss.type=focal")
    path = write(tmp_path / "ce.yaml", "base: shapes\nloss: {type: ce, gamma: 2}\n")
    assert config_error(path) == (
        f"{path}: loss.gamma=2.0 does not apply to loss.type=ce (alpha-balanced CE has gamma 0); "
        "set loss.gamma=0 or use loss.type=focal")
    # --set outranks the file's choice too: a key it does not read is refused
    assert config_error("shapes", ["data.dense.num_train=10"]).startswith(
        "--set data.dense.num_train=10: data.dense.num_train=10 does not apply to data.dataset=shapes")


def test_a_deeper_base_ranks_lower(tmp_path: Path, caplog):
    write(tmp_path / "resnet.yaml", "model:\n  backbone: {depth: 18}\n")
    write(tmp_path / "mobile.yaml", "base: resnet.yaml\nmodel:\n  backbone: {type: mobilenet_v3_small}\n")
    child = write(tmp_path / "child.yaml", "base: mobile.yaml\nsolver: {lr: 0.1}\n")
    with caplog.at_level(logging.WARNING, logger="retina.config"):
        cfg = load_config(child)
    assert (cfg.model.backbone.depth, cfg.solver.lr) == (50, 0.1)
    assert notices(caplog) == [
        "model.backbone.depth not read with model.backbone.type=mobilenet_v3_small: ignored"]
    # the nearer base wrote the key the deeper one's choice does not read: refused, naming it
    write(tmp_path / "resnet.yaml", "model:\n  backbone: {type: mobilenet_v3_small}\n")
    write(tmp_path / "mobile.yaml", "base: resnet.yaml\nmodel:\n  backbone: {depth: 18}\n")
    assert config_error(child) == (
        f"{(tmp_path / 'mobile.yaml').resolve()}: model.backbone.depth=18 does not apply to "
        "model.backbone.type=mobilenet_v3_small (only a ResNet has a depth); set model.backbone.depth=50 "
        "or use model.backbone.type=resnet")


def test_one_notice_per_choice_naming_its_keys(tmp_path: Path, caplog):
    path = write(tmp_path / "voc.yaml", "data:\n  dataset: coco\n  format: voc\n  classes: [cat, dog]\n"
                                        "loss: {type: ohem, gamma: 0, ohem: {batch_size: 256}}\n")
    with caplog.at_level(logging.WARNING, logger="retina.config"):
        cfg = load_config(path, ["data.dataset=shapes", "loss.type=focal"])
    assert (cfg.data.format, cfg.data.classes, cfg.loss.ohem.batch_size) == ("auto", (), 128)
    assert cfg.loss.gamma == 0.0  # the file's gamma is read by FL: kept
    assert notices(caplog) == ["loss.ohem.* not read with loss.type=focal: ignored",
                               "data.format, data.classes not read with data.dataset=shapes: ignored"]
    # a checkpoint's config evaluated on other data (retina eval --set ...): the same rule
    stored = config_to_dict(load_config("shapes"))
    cfg = config_from_dict(stored, ["data.dataset=coco", "data.root=photos"], source="model_final.pth")
    assert cfg.data.shapes == Config().data.shapes


def test_schema_defaults_are_reset_without_a_notice(caplog):
    with caplog.at_level(logging.WARNING, logger="retina.config"):
        assert load_config(None, ["loss.type=ce"]).loss.gamma == 0.0
        assert load_config(None, ["loss.type=quality_focal"]).loss.alpha is None
    assert notices(caplog) == []


def test_freeze_at_applies_with_either_source_of_trained_weights(tmp_path: Path, caplog):
    init = 'model.init="runs/shapes/model_final.pth"'  # quoted as retina train --init passes it
    assert load_config(None, [init, "model.backbone.freeze_at=1"]).model.backbone.freeze_at == 1
    pretrained = load_config(None, ["model.backbone.weights=DEFAULT", "model.backbone.freeze_at=1"])
    assert pretrained.model.backbone.freeze_at == 1
    assert key_applies("model.backbone.freeze_at", load_config(None, [init]))
    assert not key_applies("model.backbone.freeze_at", load_config())
    # a pretrained recipe run from scratch: its freeze_at is dropped; started from a detector: kept
    path = write(tmp_path / "pre.yaml", "model:\n  backbone: {weights: DEFAULT, freeze_at: 1}\n")
    with caplog.at_level(logging.WARNING, logger="retina.config"):
        assert load_config(path, ["model.backbone.weights=null"]).model.backbone.freeze_at == 2
    assert notices(caplog) == ["model.backbone.freeze_at not read with model.backbone.weights=null and "
                               "model.init=null: ignored"]
    assert load_config(path, ["model.backbone.weights=null", init]).model.backbone.freeze_at == 1


def test_notices_are_printed_once_and_only_when_shown(capsys):
    load_config("shapes_r18", ["loss.type=ce"])
    assert capsys.readouterr().err == ""  # a library call prints nothing
    with show_notices():
        load_config("shapes_r18", ["loss.type=ce"])
        load_config("shapes_r18", ["loss.type=ce", "solver.lr=0.1"])  # a sweep's next run: the same notice
        load_config("shapes_r18", ["model.backbone.type=mobilenet_v3_small"])
    assert capsys.readouterr().err == (
        "retina: loss.gamma not read with loss.type=ce: ignored\n"
        "retina: model.backbone.depth not read with model.backbone.type=mobilenet_v3_small: ignored\n")
    load_config("shapes_r18", ["model.backbone.type=mobilenet_v3_small"])
    assert capsys.readouterr().err == ""  # outside again


def test_replace_refuses_a_key_its_choice_does_not_read():
    # no sources to rank: every value counts as written beside the choice
    cfg = load_config()
    with pytest.raises(ConfigError, match=r"^<config>: loss.gamma=2.0 does not apply to loss.type=ce"):
        replace(cfg, loss=dataclasses.replace(cfg.loss, type="ce"))


BUNDLED = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", BUNDLED, ids=[str(p.relative_to(CONFIG_DIR)) for p in BUNDLED])
def test_every_bundled_config_and_grid_run_loads(path: Path, tmp_path: Path):
    from retina.studies.ablate import plan_sweep

    assert isinstance(load_config(path), Config)
    runs = plan_sweep(path, [], [], tmp_path)  # loads and validates every run of its grids
    assert len(runs) >= 1


def test_config_errors_are_user_errors():
    # the CLI prints RetinaError as one line; ValueError stays for callers that catch it
    assert issubclass(ConfigError, RetinaError) and issubclass(ConfigError, ValueError)
