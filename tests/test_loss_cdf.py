"""Figure 4 (retina/studies/loss_cdf.py): the normalised cumulative loss by hand, and the curves of
a trained model's positive and negative anchors."""

from __future__ import annotations

import csv
import math

import torch

from retina.studies.loss_cdf import focal_loss_of_margin, loss_cdf, normalized_cdf, sample_curve


def test_normalized_cdf_by_hand():
    # losses 3, 1 -> sorted 1, 3; cumulative 1, 4 of 4 -> 0.25, 1 at fractions 0.5, 1
    fraction, cum = normalized_cdf(torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(fraction, torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(cum, torch.tensor([0.25, 1.0], dtype=torch.float64))
    grid, y = sample_curve(fraction, cum, points=5)  # fractions 0, .25, .5, .75, 1
    torch.testing.assert_close(y, torch.tensor([0.0, 0.25, 0.25, 1.0, 1.0], dtype=torch.float64))
    # margin x_t = 0: CE = log 2, FL(gamma 2) = 0.5^2 log 2
    torch.testing.assert_close(focal_loss_of_margin(torch.tensor([0.0]), 2.0),
                               torch.tensor([0.25 * math.log(2)], dtype=torch.float64))


def test_loss_cdf_of_a_trained_run(tiny_shapes, tmp_path):
    from retina.engine.train import Trainer
    from tinyrun import tiny_config

    cfg = tiny_config(tiny_shapes, solver={"max_iter": 2, "warmup_iters": 1},
                      train={"checkpoint_period": 2, "eval_at_end": False, "tb_images": 0},
                      data={"shapes": {"num_train": 16, "num_val": 8}})  # conftest's TINY_SHAPES
    Trainer(cfg, tmp_path / "run", device="cpu", quiet=True).train()
    # 1001 points per gamma, each curve ending at (1, 1)
    res = loss_cdf(None, tmp_path / "run", [0, 2], tmp_path / "cdf", num_images=4, device="cpu")
    with open(res["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 1001 and res["num_pos"] > 0 and res["num_neg"] > res["num_pos"]
    ends = [(r["gamma"], r["fraction"], float(r["cdf_pos"]), float(r["cdf_neg"])) for r in (rows[1000], rows[-1])]
    assert ends == [("0", "1.000", 1.0, 1.0), ("2", "1.000", 1.0, 1.0)]
    assert res["png"].read_bytes()[:4] == b"\x89PNG"
