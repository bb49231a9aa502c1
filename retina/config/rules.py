"""Value rules of the config, checked after type conversion: ranges, relations between keys, and
which keys apply.

A key applies when the variant chosen by other keys reads it: ``loss.ohem.*`` only with
``loss.type=ohem``, ``solver.steps`` only with ``solver.schedule=step``, ``model.backbone.freeze_at``
only when the trunk starts from trained weights (``model.backbone.weights`` or ``model.init``);
``_SCOPES`` lists them all. A key the chosen variant does not read must hold its inert value (its
default; 0 for ``loss.gamma`` of CE and OHEM, which are FL with gamma 0). When it does not,
explicit beats inherited: the sources rank from least to most specific as the schema default, a
``base:`` file (a deeper base lower), the config file, ``--set``, and

- a value from a source at least as specific as the choice's (``--set loss.type=ce loss.gamma=2``,
  or one file writing both) is refused: a one-line ``ConfigError`` naming the source of the value
  (the ``--set`` item or the file, given by the loader's ``Origins.blame``), the key and what to do;
- a value the choice's more specific source overrode (``--set loss.type=ce`` on a file with
  ``gamma: 2.0``) is dropped: reset to its inert value, with one notice per choice, logged to the
  ``retina.config`` logger (``data.shapes.* not read with data.dataset=coco: ignored``). A schema
  default is reset without a notice: nobody wrote it. ``show_notices`` prints them, once each.

The returned ``Config`` holds the effective values. ``key_applies`` answers the same question for
a sweep table, which prints "-" for such keys. ``get_key`` reads a dotted key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator, Optional, Protocol, Sequence

from retina.config.errors import ConfigError
from retina.config.schema import Config

logger = logging.getLogger("retina.config")  # the notices of dropped keys
logger.addHandler(logging.NullHandler())  # a library call prints nothing unless asked to


class Origins(Protocol):
    """Where each key's value came from (the loader's record of the files and ``--set`` items)."""

    def blame(self, keys: Sequence[str]) -> Optional[str]:
        """The file or ``--set`` item that set the last-applied of ``keys``; None when none of
        them was set (every one is the schema default)."""

    def rank(self, key: str) -> int:
        """How specific the source of ``key``'s value is: 0 the schema default, then each file
        (a base below the file naming it), then ``--set``."""


_DEFAULTS = Config()


def _range_checks(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, ok, requirement) for every value-range rule."""
    m, loss, s, aug = cfg.model, cfg.loss, cfg.solver, cfg.data.augment
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
        ("model.num_classes", m.num_classes is None or m.num_classes >= 1, "must be >= 1 (or null)"),
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
        ("model.matcher.topk", m.matcher.topk >= 1, "must be >= 1"),
        ("model.input.min_size", len(m.input.min_size) >= 1 and min(m.input.min_size) > 0,
         "needs positive sizes"),
        ("model.input.size_divisibility", m.input.size_divisibility >= 1, "must be >= 1"),
        ("model.input.test_min_size", m.input.test_min_size is None or m.input.test_min_size > 0,
         "must be > 0 (or null: min_size[-1])"),
        ("model.input.test_max_size", m.input.test_max_size is None or m.input.test_max_size > 0,
         "must be > 0 (or null: max_size)"),
        ("model.inference.nms_thresh", 0 <= m.inference.nms_thresh <= 1, "must be in [0, 1]"),
        ("model.backbone.freeze_at", 0 <= m.backbone.freeze_at <= 5, "must be in 0..5"),
        ("model.backbone.norm_eps", m.backbone.norm_eps is None or m.backbone.norm_eps >= 0,
         "must be >= 0 (or null: the trunk's own)"),
        ("data.hflip_prob", 0 <= cfg.data.hflip_prob <= 1, "must be in [0, 1]"),
        *((f"data.augment.{k}_prob", 0 <= getattr(aug, f"{k}_prob") <= 1, "must be in [0, 1]")
          for k in ("photometric", "zoom_out", "crop")),
        ("data.augment.zoom_out_max", aug.zoom_out_max >= 1, "must be >= 1 (a canvas 1 to this many "
         "times the image's sides)"),
        ("data.augment.crop_min_ious", len(aug.crop_min_ious) >= 1 and all(0 <= v <= 1 for v in
         aug.crop_min_ious), "needs values in [0, 1] (1.0: keep the image whole)"),
        ("data.augment.crop_min_scale", 0 < aug.crop_min_scale <= 1, "must be in (0, 1]"),
        ("data.augment.scale_jitter", 0.1 <= aug.scale_jitter[0] <= aug.scale_jitter[1],
         "must be [lo, hi] with 0.1 <= lo <= hi ([1, 1]: off; LSJ: [0.1, 2.0])"),
        ("data.num_workers", cfg.data.num_workers >= 0, "must be >= 0"),
        ("data.max_bad_fraction", 0 <= cfg.data.max_bad_fraction <= 1, "must be in [0, 1]"),
        ("data.shapes.num_train", cfg.data.shapes.num_train >= 1, "must be >= 1"),
        ("data.shapes.num_val", cfg.data.shapes.num_val >= 0, "must be >= 0"),
        ("data.shapes.image_size", cfg.data.shapes.image_size >= 16, "must be >= 16"),
        ("data.shapes.extra_classes", cfg.data.shapes.extra_classes >= 0, "must be >= 0 (absent classes)"),
        ("data.dense.num_train", cfg.data.dense.num_train >= 1, "must be >= 1"),
        ("data.dense.num_val", cfg.data.dense.num_val >= 0, "must be >= 0"),
        ("data.dense.image_size", cfg.data.dense.image_size >= 32, "must be >= 32"),
        ("data.dense.num_classes", 1 <= cfg.data.dense.num_classes <= 80, "must be in 1..80 (colour x shape)"),
        ("data.classes", len(set(cfg.data.classes)) == len(cfg.data.classes), "names a class twice"),
        ("solver.lr", s.lr > 0, "must be > 0"),
        ("solver.batch_size", s.batch_size >= 1, "must be >= 1"),
        ("solver.max_iter", s.max_iter >= 1, "must be >= 1"),
        ("solver.max_minutes", s.max_minutes is None or s.max_minutes > 0, "must be > 0 (or null)"),
        ("solver.warmup_factor", 0 < s.warmup_factor <= 1, "must be in (0, 1]"),
        ("solver.warmup_iters", s.warmup_iters >= 0, "must be >= 0"),
        ("train.checkpoint_period", cfg.train.checkpoint_period >= 1, "must be >= 1"),
        ("train.log_period", cfg.train.log_period >= 1, "must be >= 1"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 0, "must be >= 0"),
        ("train.eval_period", cfg.train.eval_period >= 0, "must be >= 0"),
        ("train.skip_nonfinite", cfg.train.skip_nonfinite >= 0, "must be >= 0"),
        ("train.tb_images", cfg.train.tb_images >= 0, "must be >= 0"),
        ("train.ema.decay", 0 < cfg.train.ema.decay < 1, "must be in (0, 1)"),
        ("train.ema.warmup", cfg.train.ema.warmup > 0, "must be > 0"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, "must be >= 1"),
    ]


# The other keys a range rule reads: when one of them was set last, it is the one to blame.
_RELATED = {
    "model.fpn.max_level": ("model.fpn.min_level",),
    "model.anchors.sizes": ("model.fpn.min_level", "model.fpn.max_level"),
    "model.matcher.bg_iou_thresh": ("model.matcher.fg_iou_thresh",),
}

_UNSET = object()


@dataclass(frozen=True)
class _Scope:
    """``key`` (a key, or a section: each of its keys) is read only where ``applies`` holds for
    the values of ``by`` (a key, or several: ``applies`` takes their values in order); elsewhere
    it must keep ``inert`` (default: the schema default)."""

    key: str
    by: str | tuple[str, ...]
    applies: Callable[..., bool]
    why: str  # why the key is not read where it does not apply
    fix: str  # the other way out: the choice that reads the key
    inert: Any = _UNSET

    @property
    def selectors(self) -> tuple[str, ...]:
        return (self.by,) if isinstance(self.by, str) else self.by

    def holds(self, cfg: Config) -> bool:
        """Whether ``cfg``'s choices read ``key``."""
        return self.applies(*(get_key(cfg, k) for k in self.selectors))

    def chosen(self, cfg: Config) -> str:
        """The choice as ``--set`` writes it: ``loss.type=ce``, ``a=null and b=null``."""
        return " and ".join(f"{k}={_as_override(get_key(cfg, k))}" for k in self.selectors)

    def inert_of(self, key: str) -> Any:
        return get_key(_DEFAULTS, key) if self.inert is _UNSET else self.inert


_SCOPES: tuple[_Scope, ...] = (
    # ce and ohem are sigmoid CE, i.e. FL with gamma 0 (Table 1a, 1d); FL* has its own gamma.
    _Scope("loss.gamma", "loss.type", lambda t: t != "ce", "alpha-balanced CE has gamma 0",
           "use loss.type=focal", inert=0.0),
    _Scope("loss.gamma", "loss.type", lambda t: t != "ohem", "OHEM trains on CE, gamma 0",
           "use loss.type=focal", inert=0.0),
    _Scope("loss.gamma", "loss.type", lambda t: t != "focal_star",
           "FL* reads loss.focal_star.gamma", "use loss.type=focal"),
    _Scope("loss.alpha", "loss.type", lambda t: t != "quality_focal",
           "GFL's QFL weights positives by their IoU, not by alpha", "use loss.type=focal",
           inert=None),
    _Scope("loss.ohem", "loss.type", lambda t: t == "ohem", "read only by OHEM",
           "use loss.type=ohem"),
    _Scope("loss.focal_star", "loss.type", lambda t: t == "focal_star", "read only by FL*",
           "use loss.type=focal_star"),
    _Scope("loss.ema_momentum", "loss.normalizer", lambda n: n == "ema",
           "only the ema normaliser keeps a running mean", "use loss.normalizer=ema"),
    _Scope("loss.smooth_l1_beta", "loss.box_loss", lambda b: b == "smooth_l1", "only smooth L1 has a beta",
           "use loss.box_loss=smooth_l1"),
    _Scope("solver.steps", "solver.schedule", lambda s: s == "step",
           "the cosine schedule has no steps", "use solver.schedule=step"),
    _Scope("solver.gamma", "solver.schedule", lambda s: s == "step",
           "the cosine schedule has no steps", "use solver.schedule=step"),
    _Scope("solver.momentum", "solver.optimizer", lambda o: o == "sgd",
           "AdamW has no momentum setting", "use solver.optimizer=sgd"),
    _Scope("solver.warmup_factor", "solver.warmup_iters", lambda n: n > 0, "no warmup",
           "set solver.warmup_iters above 0"),
    _Scope("model.matcher.topk", "model.matcher.type", lambda t: t == "atss",
           "only ATSS picks candidates by distance", "use model.matcher.type=atss"),
    *(_Scope(f"model.matcher.{key}", "model.matcher.type", lambda t: t == "iou",
             "ATSS sets each box's own threshold", "use model.matcher.type=iou")
      for key in ("fg_iou_thresh", "allow_low_quality")),
    _Scope("model.backbone.depth", "model.backbone.type", lambda t: t == "resnet",
           "only a ResNet has a depth", "use model.backbone.type=resnet"),
    _Scope("model.backbone.freeze_at", ("model.backbone.weights", "model.init"),
           lambda weights, init: weights is not None or init is not None,
           "only pretrained stages are frozen", "set model.backbone.weights or model.init (--init)"),
    _Scope("data.augment.zoom_out_max", "data.augment.zoom_out_prob", lambda p: p > 0,
           "zoom-out is off", "set data.augment.zoom_out_prob above 0"),
    *(_Scope(f"data.augment.{key}", "data.augment.crop_prob", lambda p: p > 0, "the crop is off",
             "set data.augment.crop_prob above 0") for key in ("crop_min_ious", "crop_min_scale")),
    _Scope("train.ema.decay", "train.ema.enabled", lambda e: e, "EMA is off",
           "set train.ema.enabled=true"),
    _Scope("train.ema.warmup", "train.ema.enabled", lambda e: e, "EMA is off",
           "set train.ema.enabled=true"),
    _Scope("data.max_bad_fraction", "data.on_bad_image", lambda p: p == "skip",
           "the first bad image stops the run", "use data.on_bad_image=skip"),
    _Scope("data.shapes", "data.dataset", lambda d: d == "shapes",
           "read only by the generated shapes set", "use data.dataset=shapes"),
    _Scope("data.dense", "data.dataset", lambda d: d == "dense",
           "read only by the generated dense set", "use data.dataset=dense"),
    *(_Scope(f"data.{key}", "data.dataset", lambda d: d == "coco",
             "the generated sets have fixed paths under data.root", "use data.dataset=coco")
      for key in ("train_ann", "train_images", "val_ann", "val_images")),
    *(_Scope(f"data.{key}", "data.dataset", lambda d: d == "coco",
             "the generated sets are COCO json", "use data.dataset=coco")
      for key in ("format", "train_split", "val_split", "classes", "keep_difficult")),
    _Scope("data.classes", "data.format", lambda f: f in ("auto", "voc"), "read for VOC folders "
           "only: a YOLO data.yaml and a COCO json name their classes", "use data.format=voc"),
    _Scope("data.keep_difficult", "data.format", lambda f: f in ("auto", "voc"),
           "only VOC marks objects difficult", "use data.format=voc"),
    *(_Scope(f"data.{key}", "data.format", lambda f: f != "coco", "COCO json files are named by "
             "data.train_ann / data.val_ann", "use data.format=voc or yolo")
      for key in ("train_split", "val_split")),
    *(_Scope(f"data.{key}", "data.format", lambda f: f in ("auto", "coco"),
             "a VOC or YOLO folder names its own files", "use data.format=coco")
      for key in ("train_ann", "train_images", "val_ann", "val_images")),
)


def _covers(scope: _Scope, key: str) -> bool:
    return key == scope.key or key.startswith(scope.key + ".")


def key_applies(key: str, cfg: Config) -> bool:
    """Whether ``cfg``'s choices read the dotted ``key`` (``loss.gamma`` of a ``loss.type=ohem``
    config does not: OHEM's CE has gamma 0). Keys no choice gates always apply."""
    return all(s.holds(cfg) for s in _SCOPES if _covers(s, key))


def _leaf_keys(cfg: Any, key: str) -> Iterator[str]:
    """``key`` itself, or every key under it when it names a section."""
    value = get_key(cfg, key)
    if not dataclasses.is_dataclass(value):
        yield key
        return
    for f in dataclasses.fields(value):
        yield from _leaf_keys(cfg, f"{key}.{f.name}")


def _as_override(value: Any) -> str:
    """``value`` as it would be written after ``--set key=``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(_as_override(v) for v in value) + "]"
    return str(value)


def _not_read(cfg: Config) -> Iterator[tuple[str, _Scope, Any]]:
    """(key, scope, inert value) of each key off its inert value although ``cfg``'s choices do
    not read it."""
    for scope in _SCOPES:
        if scope.holds(cfg):
            continue
        for key in _leaf_keys(cfg, scope.key):
            inert = scope.inert_of(key)
            if get_key(cfg, key) != inert:
                yield key, scope, inert


def _with_key(cfg: Any, key: str, value: Any) -> Any:
    """``cfg`` with the dotted ``key`` set to ``value``."""
    head, _, rest = key.partition(".")
    return dataclasses.replace(cfg, **{head: _with_key(getattr(cfg, head), rest, value) if rest else value})


def _drop_overridden(cfg: Config, origins: Origins) -> tuple[Config, list[tuple[str, _Scope, str]]]:
    """``cfg`` with each key that a more specific source's choice does not read reset to its
    inert value; (key, scope, the choice) of each reset."""
    dropped: list[tuple[str, _Scope, str]] = []
    while True:  # a reset selector (data.format under data.dataset=shapes) may leave more unread;
        # each pass resets a key to the inert value of a choice the config holds: it ends
        found = [(key, scope, inert, scope.chosen(cfg)) for key, scope, inert in _not_read(cfg)
                 if origins.rank(key) < max(map(origins.rank, scope.selectors))]
        if not found:
            return cfg, dropped
        for key, scope, inert, chosen in found:
            cfg = _with_key(cfg, key, inert)
            dropped.append((key, scope, chosen))


def _notices(dropped: list[tuple[str, _Scope, str]], origins: Origins) -> list[str]:
    """One line per choice naming the keys it dropped that a file or ``--set`` item wrote (a
    section as ``section.*``): ``data.shapes.* not read with data.dataset=coco: ignored``."""
    names: dict[str, list[str]] = {}
    for key, scope, chosen in dropped:
        name = key if key == scope.key else f"{scope.key}.*"
        if origins.rank(key) > 0 and name not in names.setdefault(chosen, []):
            names[chosen].append(name)
    return [f"{', '.join(keys)} not read with {chosen}: ignored" for chosen, keys in names.items() if keys]


def validate(cfg: Config, source: str = "<config>", origins: Optional[Origins] = None) -> Config:
    """The effective ``cfg``: keys that a more specific source's choice does not read reset to
    their inert values (a notice each on the ``retina.config`` logger), when every value is in
    range and no other key is set where its choice does not read it; else a one-line
    ``ConfigError`` naming ``origins.blame(keys)`` (or ``source``), the key and the remedy.
    Without ``origins`` every value ranks alike: a key that does not apply is refused."""
    cfg, dropped = _drop_overridden(cfg, origins) if origins is not None else (cfg, [])

    def origin(*keys: str) -> str:
        found = origins.blame(keys) if origins is not None else None
        return found if found is not None else source

    def shown(key: str) -> str:  # key=value, marked when nobody set it
        unset = origins is not None and origins.blame([key]) is None
        return f"{key}={get_key(cfg, key)!r}" + (" (the default)" if unset else "")

    for key, ok, requirement in _range_checks(cfg):
        if not ok:
            raise ConfigError(f"{origin(key, *_RELATED.get(key, ()))}: {shown(key)} {requirement}")
    not_read = list(_not_read(cfg))
    if not_read:  # every key of the first choice at once: one error to fix, not one per key
        scope = not_read[0][1]
        group = [(key, inert) for key, s, inert in not_read if s is scope]
        keys = [key for key, _ in group]
        listed = shown(keys[0]) if len(keys) == 1 else \
            f"{', '.join(shown(k) for k in keys[:-1])} and {shown(keys[-1])}"
        resets = " ".join(f"{key}={_as_override(inert)}" for key, inert in group)
        raise ConfigError(f"{origin(*keys, *scope.selectors)}: {listed} {'does' if len(keys) == 1 else 'do'} "
                          f"not apply to {scope.chosen(cfg)} ({scope.why}); set {resets} or {scope.fix}")
    for line in _notices(dropped, origins) if origins is not None else ():
        logger.warning(line)
    return cfg


class _PrintOnce(logging.Handler):
    def __init__(self, stream: Optional[IO[str]]) -> None:
        super().__init__()
        self.stream, self.seen = stream, set()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line not in self.seen:
            self.seen.add(line)
            print(f"retina: {line}", file=self.stream or sys.stderr, flush=True)


@contextlib.contextmanager
def show_notices(stream: Optional[IO[str]] = None) -> Iterator[None]:
    """While inside, each notice of the config printed once to ``stream`` (default: stderr) as
    ``retina: <notice>``, as the CLI shows them: a sweep that loads each run's config twice, or
    several runs dropping the same keys, prints it once."""
    handler = _PrintOnce(stream)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def get_key(cfg: Any, key: str) -> Any:
    """The value of a dotted key: ``get_key(cfg, 'loss.gamma')``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg
