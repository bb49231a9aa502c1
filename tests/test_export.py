"""retina export: the exported graph against eager PyTorch (ONNX through onnxruntime, and the
torch.export program), predict/eval through the exported file, the parity check, and the
inference-time BatchNorm folding. One tiny untrained model whose head is set so that many
scores pass the threshold (ResNet-18, 48-channel FPN on P3-P5, 64 px test size)."""

from __future__ import annotations

import dataclasses

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from retina.cli import main
from retina.config import config_to_dict
from retina.data.coco import read_image
from retina.deploy.fuse import fold_batchnorm, inference_model
from retina.deploy.graph import DetectorGraph, _pad_per_image, resized_size_tensor
from retina.deploy.parity import Parity, compare_image
from retina.deploy.runtime import ExportedDetector, load_exported
from retina.engine.checkpoint import load_model, save_checkpoint
from retina.errors import InputError
from retina.model import build_model
from retina.model.resize import resized_size

from tinyrun import tiny_config

CLASSES = ["square", "circle", "triangle"]


def _nonzero_model(cfg):
    """An untrained model with detections: class logits spread (std 0.2 weights, bias -2, so
    sigmoid scores around 0.12 with many above 0.05), random box deltas, and random BatchNorm
    statistics so that folding them changes the convolutions."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.head.cls_logits.weight, std=0.2)
        model.head.cls_logits.bias.fill_(-2.0)
        torch.nn.init.normal_(model.head.box_deltas.weight, std=0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    return model


def _run_cli(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def run_dir(tiny_shapes: Path, tiny_shapes_overrides, tmp_path_factory) -> Path:
    cfg = tiny_config(tiny_shapes, model={"num_classes": 3},
                      data={"shapes": {"num_train": 16, "num_val": 8, "image_size": 64, "seed": 0}})
    model = _nonzero_model(cfg)
    run = tmp_path_factory.mktemp("export") / "run"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "class_names": CLASSES,
                     "cat_ids": [1, 2, 3], "iteration": 0}, run / "model_final.pth")
    return run


@pytest.fixture(scope="module")
def onnx_export(run_dir: Path) -> tuple[Path, str]:
    """``retina export --dynamic`` to ONNX, its parity check on all 8 shapes val images."""
    code, out = _run_cli(["export", "--weights", str(run_dir), "--dynamic", "--num-images", "8"])
    assert code == 0, out
    return run_dir / "model.onnx", out


def _eager(run_dir: Path):
    model, _, _, _ = load_model(run_dir)
    return model


def _images(*shapes: tuple[int, int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]


def _assert_parity(model, detector, images: list[torch.Tensor]) -> Parity:
    """Eager on each image alone against the detector on the batch of them (one size)."""
    parity = Parity()
    with torch.inference_mode():
        outs = detector(images)
        for i, image in enumerate(images):
            h, w = image.shape[-2:]
            rh, rw = resized_size(h, w, 64, 64)  # the tiny config's test size
            compare_image(parity, model([image])[0], outs[i], 0.05, 100, name=str(i),
                          px_scale=max(h / rh, w / rw))
    assert parity.ok, (parity.summary(), parity.notes)
    assert parity.pairs > 0 and parity.mismatches == 0
    return parity


# ---------------------------------------------------------------------------- graph pieces
@pytest.mark.parametrize("mode", ["round", "torchvision"])
def test_resized_size_tensor_is_the_rule(mode):
    # every H, W in a grid crossing the no-resize band (scale within 1e-3 of 1 at 800 x 1333),
    # portrait and landscape, and sizes where the longer side binds
    sides = [1, 7, 63, 64, 65, 480, 599, 640, 799, 800, 801, 1000, 1333, 1334, 4000]
    pairs = [(h, w) for h in sides for w in sides]
    # and every shorter side to 1500: in float64, floor(h * (800 / h)) is 799 for h = 97, 161, ...
    # and 800 for h = 417, where 800 * (1 / 417) would give 799; the graph rounds as Python does
    pairs += [(h, w) for h in range(1, 1501) for w in (h, 650)]
    for h, w in pairs:
        got = resized_size_tensor(torch.tensor(h), torch.tensor(w), 800, 1333, mode).tolist()
        assert tuple(got) == resized_size(h, w, 800, 1333, mode), (h, w)


def test_pad_per_image_keeps_order_and_caps():
    # detections of the batch by decreasing score, images [1, 0, 1, 1], cap 2 per image:
    # image 0 gets row 0 = detection 1; image 1 gets detections 0 and 2 (3 is cut by the cap)
    boxes = torch.arange(16, dtype=torch.float32).view(4, 4)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([2, 0, 1, 1])
    images = torch.tensor([1, 0, 1, 1])
    b, s, lab, num = _pad_per_image(boxes, scores, labels, images, n=2, per_image=2)
    assert num.tolist() == [1, 2]
    torch.testing.assert_close(s, torch.tensor([[0.8, 0.0], [0.9, 0.7]]))
    assert lab.tolist() == [[0, -1], [2, 1]]
    assert b[1].tolist() == [boxes[0].tolist(), boxes[2].tolist()]
    assert b[0, 1].tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("test_size", [None, (48, 80)])
def test_graph_in_eager_equals_model_on_two_sizes(run_dir: Path, test_size):
    model = _eager(run_dir)
    if test_size is not None:  # model.input.test_min_size / test_max_size: both resize to it
        model.input_spec = dataclasses.replace(model.input_spec, test_min_size=test_size[0],
                                               test_max_size=test_size[1])
    graph = DetectorGraph(model)
    for shape in [(64, 64), (50, 90)]:
        batch = torch.stack(_images(shape, shape))  # (2, 3, H, W)
        with torch.inference_mode():
            ref = model(list(batch))
            boxes, scores, labels, num = graph(batch)
        for i in range(2):
            n = int(num[i])
            assert n == len(ref[i]["scores"]) > 0
            torch.testing.assert_close(boxes[i, :n], ref[i]["boxes"])
            torch.testing.assert_close(scores[i, :n], ref[i]["scores"])
            assert torch.equal(labels[i, :n], ref[i]["labels"])
            assert (labels[i, n:] == -1).all()


# ----------------------------------------------------------------------------------- ONNX
def test_export_cli_reports_parity_on_shapes_val(onnx_export):
    path, out = onnx_export
    assert path.is_file()
    line = [ln for ln in out.splitlines() if ln.startswith("parity")][-1]
    assert line.startswith("parity OK on 8 images") and "mismatches 0" in line


def test_onnx_dynamic_matches_eager_on_two_sizes_and_batches(run_dir, onnx_export):
    model = _eager(run_dir)
    detector, cfg, names, cat_ids = load_exported(onnx_export[0])
    assert names == CLASSES and cat_ids == [1, 2, 3] and cfg.model.num_classes == 3
    _assert_parity(model, detector, _images((64, 64), (64, 64)))  # the export's size, batch 2
    _assert_parity(model, detector, _images((50, 90), (50, 90), (50, 90), seed=1))  # another, batch 3
    _assert_parity(model, detector, _images((97, 41), seed=2))  # portrait, downscaled


def test_onnx_metadata_holds_class_names_and_contract(onnx_export):
    import onnx

    proto = onnx.load(str(onnx_export[0]))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES
    assert json.loads(meta["input_shape"]) == ["batch", 3, "height", "width"]
    assert meta["input_dtype"] == "uint8" and meta["outputs"] == "boxes,scores,labels,num_detections"
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "num_detections"]


def test_predict_and_eval_through_onnx_equal_the_checkpoint(run_dir, onnx_export, tiny_shapes, tmp_path):
    onnx_path = onnx_export[0]
    val = str(tiny_shapes / "val")
    for name, weights in (("pth", run_dir), ("onnx", onnx_path)):
        code, _ = _run_cli(["predict", "--weights", str(weights), "-i", val, "-o", str(tmp_path / f"p_{name}"),
                            "--score-thresh", "0.1"])
        assert code == 0
        code, out = _run_cli(["eval", "--weights", str(weights), "-o", str(tmp_path / f"e_{name}")])
        assert code == 0
        # which file was scored: the run's model_final.pth, saved at iteration 0 by the fixture;
        # an export records no iteration
        line, scored = {"pth": (f"evaluating {run_dir / 'model_final.pth'} (iteration 0)",
                                {"path": str(run_dir / "model_final.pth"), "iteration": 0}),
                        "onnx": (f"evaluating {onnx_path}", {"path": str(onnx_path), "iteration": None})}[name]
        assert out.splitlines()[0] == line
        assert json.loads((tmp_path / f"e_{name}" / "metrics.json").read_text())["checkpoint"] == scored
    a = json.loads((tmp_path / "p_pth" / "detections.json").read_text())
    b = json.loads((tmp_path / "p_onnx" / "detections.json").read_text())
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):  # bbox written to 0.01 px, score to 1e-4: a rounding may flip a digit
        assert (x["file_name"], x["category_id"]) == (y["file_name"], y["category_id"])
        assert max(abs(u - v) for u, v in zip(x["bbox"], y["bbox"])) <= 0.01 + 1e-6
        assert abs(x["score"] - y["score"]) <= 1e-4 + 1e-9
    drawn = sorted(p.name for p in (tmp_path / "p_onnx").glob("*.png"))  # PNG inputs: PNG drawings
    assert drawn == sorted(p.name for p in (tmp_path / "p_pth").glob("*.png")) and len(drawn) == 8
    ma = json.loads((tmp_path / "e_pth" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "e_onnx" / "metrics.json").read_text())
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert mb[key] == pytest.approx(ma[key], abs=1e-6), key


def test_analyze_errors_runs_an_exported_model(run_dir, onnx_export, tmp_path):
    # it said "not a checkpoint" for the .onnx that eval and predict take
    summaries = []
    for name, weights in (("pth", run_dir), ("onnx", onnx_export[0])):
        code, _ = _run_cli(["analyze", "errors", "--weights", str(weights), "--out", str(tmp_path / name)])
        assert code == 0
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    a, b = summaries
    assert a["num_detections"] == b["num_detections"] > 0
    assert b["metrics"]["AP"] == pytest.approx(a["metrics"]["AP"], abs=1e-6)


def test_exported_model_refuses_settings_it_holds_as_constants(run_dir, onnx_export, tmp_path, capsys):
    # a score threshold or test size given for an .onnx was read and silently not used: the
    # graph holds its own, so the AP came out unchanged
    onnx_path = onnx_export[0]
    code, _ = _run_cli(["eval", "--weights", str(onnx_path), "-o", str(tmp_path / "e"),
                        "--set", "model.inference.score_thresh=0.5", "model.input.test_min_size=48"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"retina: error: {onnx_path} has its inference and input settings built in, so "
        "model.inference.score_thresh: 0.05 -> 0.5 cannot apply (nor 1 more); run the checkpoint with "
        "them, or export it again with --set\n")
    assert not (tmp_path / "e").exists()
    # what the file does not hold is read as for a checkpoint
    code, _ = _run_cli(["eval", "--weights", str(onnx_path), "-o", str(tmp_path / "e"), "--set", "eval.batch_size=2"])
    assert code == 0


def test_onnx_parity_on_raccoon_photos_of_several_sizes(run_dir, onnx_export, raccoon_voc):
    photos = sorted((raccoon_voc / "JPEGImages").glob("*.jpg"))
    by_size: dict[tuple[int, int], Path] = {}
    for p in photos:
        with Image.open(p) as im:
            by_size.setdefault(im.size, p)
        if len(by_size) == 4:
            break
    assert len(by_size) == 4
    model, detector = _eager(run_dir), load_exported(onnx_export[0])[0]
    for path in by_size.values():
        _assert_parity(model, detector, [read_image(path)])


def test_export_refuses_hflip_tta(run_dir, tmp_path, capsys):
    # the graph detects each image once: the eager model with the mirror merge could not match it
    assert main(["export", "--weights", str(run_dir), "--out", str(tmp_path / "m.onnx"),
                 "--set", "model.inference.hflip_tta=true"]) == 2
    assert capsys.readouterr().err == ("retina: error: model.inference.hflip_tta is not exported (the exported "
                                       "graph detects each image once); export with --set "
                                       "model.inference.hflip_tta=false\n")
    assert not (tmp_path / "m.onnx").exists()


def test_export_without_onnxruntime_says_how_to_install(run_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert main(["export", "--weights", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'retina[export]'" in err


# ---------------------------------------------------------------------------- torch.export
def test_pt2_export_round_trip(run_dir, tmp_path):
    path = tmp_path / "model.pt2"
    code, out = _run_cli(["export", "--weights", str(run_dir), "--format", "pt2", "--dynamic",
                          "--out", str(path), "--num-images", "2"])
    assert code == 0 and "parity OK on 2 images" in out, out
    assert f"wrote {path} (" in out and ", pt2, input ['batch', 3, 'height', 'width'] uint8)" in out
    extra = {"class_names": ""}
    program = torch.export.load(str(path), extra_files=extra).module()  # no retina code needed
    assert json.loads(extra["class_names"]) == CLASSES
    model = _eager(run_dir)
    image = _images((80, 60))[0]
    with torch.inference_mode():
        boxes, scores, labels, num = program(image[None])
        ref = model([image])[0]
    n = int(num[0])
    assert n == len(ref["scores"]) > 0
    torch.testing.assert_close(boxes[0, :n], ref["boxes"], atol=1e-3, rtol=0)
    assert torch.equal(labels[0, :n], ref["labels"])


def test_torchscript_is_a_deprecated_name_of_pt2(run_dir, monkeypatch, capsys):
    # the former name of pt2 writes the same file, with a notice naming the new one
    import retina.deploy.export as export

    written = []

    def record(model, path, fmt, *args, **kwargs):
        written.append((path, fmt))
        raise InputError("recorded")  # nothing exported: the choice of format is what is tested

    monkeypatch.setattr(export, "export_model", record)
    assert main(["export", "--weights", str(run_dir), "--format", "torchscript", "--num-images", "1"]) == 2
    assert written == [(run_dir / "model.pt2", "pt2")]
    assert capsys.readouterr().err.splitlines() == [
        "retina: --format torchscript is deprecated: it writes a torch.export program (.pt2); use --format pt2",
        "retina: error: recorded"]


# ------------------------------------------------------------------------------- runtime
class _Fixed(ExportedDetector):
    """A detector exported for (1, 3, 64, 64) that returns no detections."""

    def __init__(self):
        super().__init__(Path("fixed.onnx"), {"input_dtype": "uint8", "input_shape": "[1, 3, 64, 64]"})

    def run(self, batch):
        n = batch.shape[0]
        return torch.zeros(n, 2, 4), torch.zeros(n, 2), torch.full((n, 2), -1), torch.zeros(n, dtype=torch.long)


def test_static_export_refuses_another_shape_and_float_input():
    det = _Fixed()
    assert [len(o["boxes"]) for o in det(_images((64, 64), (64, 64)))] == [0, 0]  # one image per run
    with pytest.raises(InputError, match=r"fixed.onnx was exported for input \[1, 3, 64, 64\]"):
        det(_images((64, 65)))
    with pytest.raises(InputError, match="takes uint8 images"):
        det([torch.rand(3, 64, 64)])


def test_parity_allows_ties_and_counts_mismatches():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 0.0, 50.0, 10.0]])
    ref = {"boxes": box, "scores": torch.tensor([0.9, 0.5, 0.5000001]), "labels": torch.tensor([0, 1, 1])}
    # the exported run kept only one of the two tied 0.5 scores, and moved box 0 by 5e-4 px
    out = {"boxes": box[:2] + torch.tensor([5e-4, 0, 0, 0]), "scores": torch.tensor([0.9, 0.5]),
           "labels": torch.tensor([0, 1])}
    parity = Parity()
    compare_image(parity, ref, out, score_thresh=0.05, detections_per_image=100)
    assert (parity.pairs, parity.ties, parity.mismatches) == (2, 1, 0) and parity.ok
    assert parity.max_box_diff == pytest.approx(5e-4, abs=1e-6)
    # another label is a mismatch (no pair), and so is a box 2e-3 px away (over the tolerance)
    parity = Parity()
    compare_image(parity, ref, {**ref, "labels": torch.tensor([2, 1, 1])}, 0.05, 100)
    assert parity.mismatches == 2 and not parity.ok  # eager label 0 and exported label 2
    parity = Parity()
    compare_image(parity, ref, {**ref, "boxes": box + 2e-3}, 0.05, 100)
    assert parity.mismatches == 0 and not parity.ok  # at 50 px: allowed 1e-3 + 1.3e-6 x 50 = 1.07e-3
    # the same 2e-3 px on a box at 1000 px is float32 rounding: 1e-3 + 1.3e-6 x 1000 = 2.3e-3
    far = {**ref, "boxes": box + 1000.0}
    parity = Parity()
    compare_image(parity, far, {**far, "boxes": far["boxes"] + 2e-3}, 0.05, 100)
    assert parity.ok and parity.max_box_diff == pytest.approx(2e-3, abs=1e-4)
    # ... but not 2.5e-3 there
    parity = Parity()
    compare_image(parity, far, {**far, "boxes": far["boxes"] + 2.5e-3}, 0.05, 100)
    assert not parity.ok


# ------------------------------------------------------------------------------- folding
def test_fold_batchnorm_keeps_detections(run_dir):
    model = _eager(run_dir)
    folded = inference_model(_eager(run_dir))
    # ResNet-18: stem 1 + 8 BasicBlocks x 2 + 3 downsample = 20 BatchNorm layers, none left
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert fold_batchnorm(_eager(run_dir).backbone) == 1 + 8 * 2 + 3
    images = _images((64, 64), (50, 90), seed=3)
    with torch.inference_mode():
        for image in images:
            a, b = model([image])[0], folded([image])[0]
            assert torch.equal(a["labels"], b["labels"]) and len(a["labels"]) > 0
            torch.testing.assert_close(b["boxes"], a["boxes"], atol=1e-3, rtol=0)
            torch.testing.assert_close(b["scores"], a["scores"], atol=1e-5, rtol=0)


def test_fold_frozen_batchnorm_is_the_same_affine_map():
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    bn = FrozenBatchNorm2d(4, eps=1e-5)
    bn.weight.uniform_(0.5, 2)
    bn.bias.normal_()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    seq = torch.nn.Sequential(conv, bn).eval()
    x = torch.randn(2, 3, 8, 8)
    ref = seq(x)
    assert fold_batchnorm(seq) == 1 and isinstance(seq[1], torch.nn.Identity)
    torch.testing.assert_close(seq(x), ref, atol=1e-5, rtol=1e-5)


def test_inference_benchmark_rows_per_lever():
    from benchmarks.inference import InferenceSpec, format_table, run

    spec = InferenceSpec(model="config", config="shapes", image_size=(64, 64), batch_sizes=(1, 2),
                         repeats=1, levers=("eager", "fold_bn", "fold_bn+channels_last"))
    result = run(spec, log=lambda s: None)
    rows = [(r["batch"], r["lever"]) for r in result["rows"]]
    assert rows == [(n, lever) for n in (1, 2) for lever in spec.levers]
    assert all(r["baseline"] == "eager" for r in result["rows"])  # no torchvision model for a config
    assert [r["ratio"] for r in result["rows"] if r["lever"] == "eager"] == [1.0, 1.0]
    assert "fold_bn+channels_last" in format_table(result)
