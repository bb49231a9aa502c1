"""Value rules of the config: ranges and relations between keys, checked after type conversion.

``validate`` raises a one-line ``ConfigError`` naming the key; ``get_key`` reads a dotted key.
"""

from __future__ import annotations

from typing import Any

from retina.config.errors import ConfigError
from retina.config.schema import Config


def _range_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, ok, requirement) for every value-range rule."""
    m, loss, s = cfg.model, cfg.loss, cfg.solver
    return [
        ("loss.gamma", loss.gamma >= 0, "must be >= 0"),
        ("loss.alpha", loss.alpha is None or 0 <= loss.alpha <= 1, "must be in [0, 1] or null"),
        ("loss.smooth_l1_beta", loss.smooth_l1_beta >= 0, "must be >= 0"),
        ("loss.ema_momentum", 0 <= loss.ema_momentum < 1, "must be in [0, 1)"),
        ("loss.ohem.nms", 0 < loss.ohem.nms <= 1, "must be in (0, 1]"),
        ("loss.ohem.batch_size", loss.ohem.batch_size >= 1, "must be >= 1"),
        ("loss.ohem.ratio", loss.ohem.ratio is None or 0 < loss.ohem.ratio < 1,
         "must be in (0, 1) or null"),
        ("loss.focal_star.gamma", loss.focal_star.gamma > 0, "must be > 0"),
        ("model.num_classes", m.num_classes >= 1, "must be >= 1"),
        ("model.head.prior_prob", 0 <= m.head.prior_prob < 1, "must be in [0, 1)"),
        ("model.head.num_convs", m.head.num_convs >= 0, "must be >= 0"),
        ("model.fpn.channels", m.fpn.channels >= 1, "must be >= 1"),
        ("model.fpn.min_level", 3 <= m.fpn.min_level <= 5, "must be in 3..5"),
        ("model.fpn.max_level", m.fpn.min_level <= m.fpn.max_level <= 8, "must be in min_level..8"),
        ("model.anchors.sizes", len(m.anchors.sizes) in (0, m.fpn.max_level - m.fpn.min_level + 1),
         "needs one size per level (max_level - min_level + 1) or none"),
        ("model.anchors.scales", len(m.anchors.scales) >= 1 and min(m.anchors.scales) > 0,
         "needs positive values"),
        ("model.anchors.ratios", len(m.anchors.ratios) >= 1 and min(m.anchors.ratios) > 0,
         "needs positive values"),
        ("model.matcher.bg_iou_thresh", 0 <= m.matcher.bg_iou_thresh <= m.matcher.fg_iou_thresh,
         "must be in [0, fg_iou_thresh]"),
        ("model.matcher.fg_iou_thresh", m.matcher.fg_iou_thresh <= 1, "must be <= 1"),
        ("model.input.min_size", len(m.input.min_size) >= 1 and min(m.input.min_size) > 0,
         "needs positive sizes"),
        ("model.input.size_divisibility", m.input.size_divisibility >= 1, "must be >= 1"),
        ("model.inference.nms_thresh", 0 <= m.inference.nms_thresh <= 1, "must be in [0, 1]"),
        ("model.backbone.freeze_at", 0 <= m.backbone.freeze_at <= 5, "must be in 0..5"),
        ("model.backbone.norm_eps", m.backbone.norm_eps >= 0, "must be >= 0"),
        ("data.hflip_prob", 0 <= cfg.data.hflip_prob <= 1, "must be in [0, 1]"),
        ("data.num_workers", cfg.data.num_workers >= 0, "must be >= 0"),
        ("data.max_bad_fraction", 0 <= cfg.data.max_bad_fraction <= 1, "must be in [0, 1]"),
        ("solver.lr", s.lr > 0, "must be > 0"),
        ("solver.batch_size", s.batch_size >= 1, "must be >= 1"),
        ("solver.max_iter", s.max_iter >= 1, "must be >= 1"),
        ("solver.warmup_factor", 0 < s.warmup_factor <= 1, "must be in (0, 1]"),
        ("solver.warmup_iters", s.warmup_iters >= 0, "must be >= 0"),
        ("train.checkpoint_period", cfg.train.checkpoint_period >= 1, "must be >= 1"),
        ("train.log_period", cfg.train.log_period >= 1, "must be >= 1"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 0, "must be >= 0"),
        ("train.eval_period", cfg.train.eval_period >= 0, "must be >= 0"),
        ("train.skip_nonfinite", cfg.train.skip_nonfinite >= 0, "must be >= 0"),
        ("train.tb_images", cfg.train.tb_images >= 0, "must be >= 0"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, "must be >= 1"),
    ]


def validate(cfg: Config, source: str = "<config>") -> Config:
    for key, ok, requirement in _range_checks(cfg):
        if not ok:
            value = get_key(cfg, key)
            raise ConfigError(f"{source}: {key}={value!r} {requirement}")
    return cfg


def get_key(cfg: Any, key: str) -> Any:
    """The value of a dotted key: ``get_key(cfg, 'loss.gamma')``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
