"""Host side of the rewards: parse completions, pad into bucketed arrays, run the jitted reward function."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from .output_format import LABELS, format_ok, parse_regions, parse_verdict
from .reward_math import reward_core
from .stages import RELAXATIONS, ConfigLike, WeightsLike, load_config, resolve_weights

KEYS = ("total", "format", "label", "iou", "iou_relaxed")


MIN_BATCH_BUCKET = 8
MIN_BOX_BUCKET = 4


def next_power_of_two(n: int, minimum: int = 1) -> int:
    """Padded size for n items: the next power of two, at least `minimum` (keeps the number of compiles small)."""
    return max(minimum, 1 if n <= 1 else 1 << (int(n) - 1).bit_length())


def _target(t: Mapping[str, Any]) -> tuple[str, np.ndarray]:
    try:
        label = str(t["label"]).strip().lower()
    except (KeyError, TypeError):
        raise ValueError(f"a target needs a 'label' key, got {t!r}") from None
    if label not in LABELS:
        raise ValueError(f"target label must be one of {LABELS}, got {t['label']!r}")
    if "boxes" not in t and label == "generated":  # (IoU 0 for every completion, silently, before)
        near = sorted(k for k in t if k in ("bbox", "bboxes", "box", "regions"))
        raise ValueError(f"a generated target needs its true boxes under 'boxes' ([[x1, y1, x2, y2], ...]; [] for "
                         f"none), got the keys {sorted(t)}" + (f": {near[0]!r} is not read (a native record's "
                         "regions: 'boxes': [r['bbox'] for r in record['regions']])" if near else ""))
    raw = t.get("boxes")
    boxes = np.zeros((0, 4)) if raw is None or len(raw) == 0 else np.asarray(raw, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"target boxes must be [[x1, y1, x2, y2], ...], got shape {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError("target boxes must be finite")
    return label, boxes


def prepare_batch(completions: Sequence[str], targets: Sequence[Mapping[str, Any]],
                  group_size: Optional[int] = None) -> dict[str, np.ndarray]:
    """Parse on the host and pad: the inputs of `reward_core` as float64 / bool numpy arrays.

    Completion i belongs to target i // G with G = len(completions) // len(targets) (or `group_size`):
    either one target per completion, or each target repeated for a contiguous group. The batch axis is
    padded to a power of two (at least 8), boxes to powers of two (at least 4). Only the first (number of
    GT boxes) predicted boxes of a completion can ever be matched, so later ones are not copied.
    """
    n_c, n_t = len(completions), len(targets)
    if group_size is None:
        if n_t == 0 or n_c % n_t:
            raise ValueError(f"{n_c} completions do not split into groups over {n_t} targets")
        group_size = n_c // n_t
    if group_size < 1 or n_c != n_t * group_size:
        raise ValueError(f"{n_c} completions != {n_t} targets x group size {group_size}")
    g = group_size
    labels, gts = zip(*(_target(t) for t in targets))
    preds, fmt, lab = [], np.zeros((n_t, g), bool), np.zeros((n_t, g), bool)
    for i, text in enumerate(completions):
        if text is None:  # (no completion: scored as an empty one)
            text = ""
        elif not isinstance(text, str):  # (token ids were scored as the text "[1, 2, 3]": -1 each, no word)
            raise TypeError(f"completions[{i}] is a {type(text).__name__}, not a string: decode the tokens first "
                            "(tokenizer.decode), and pass the text")
        n, k = divmod(i, g)
        truth = labels[n]
        fmt[n, k] = format_ok(text, truth)
        lab[n, k] = parse_verdict(text) == truth
        keep = 0 if truth == "real" else len(gts[n])
        preds.append(parse_regions(text)[1][:keep] if keep else ())
    n_pad = next_power_of_two(n_t, MIN_BATCH_BUCKET)
    p = next_power_of_two(max((len(b) for b in preds), default=0), MIN_BOX_BUCKET)
    t = next_power_of_two(max((len(b) for b in gts), default=0), MIN_BOX_BUCKET)
    out = dict(pred=np.zeros((n_pad, g, p, 4)), pred_mask=np.zeros((n_pad, g, p), bool),
               gt=np.zeros((n_pad, t, 4)), gt_mask=np.zeros((n_pad, t), bool),
               is_real=np.zeros(n_pad, bool),
               format_ok=np.zeros((n_pad, g), bool), label_ok=np.zeros((n_pad, g), bool))
    for i, boxes in enumerate(preds):
        if boxes:
            n, k = divmod(i, g)
            out["pred"][n, k, :len(boxes)] = boxes
            out["pred_mask"][n, k, :len(boxes)] = True
    for n, (label, boxes) in enumerate(zip(labels, gts)):
        out["gt"][n, :len(boxes)] = boxes
        out["gt_mask"][n, :len(boxes)] = True
        out["is_real"][n] = label == "real"
    out["format_ok"][:n_t], out["label_ok"][:n_t] = fmt, lab
    return out


def _cpu_device():
    # This process's own device: in a multi-process run jax.devices()[0] belongs to process 0.
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu: the default device then
        return jax.local_devices()[0]


def relax_params(relaxation: str, eta: float, power: float) -> np.ndarray:
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
    if not (math.isfinite(eta) and math.isfinite(power) and eta > 0 and power > 0):
        raise ValueError(f"eta and power must be positive and finite (as a reward file's), got eta {eta}, "
                         f"power {power}")
    return np.array([1.0 if relaxation == "paper" else 0.0, eta, power], dtype=np.float64)


def score(completions: Sequence[str], targets: Sequence[Mapping[str, Any]], stage: Optional[str] = "alpha", *,
          weights: Optional[WeightsLike] = None, relaxation: Optional[str] = None, eta: Optional[float] = None,
          power: Optional[float] = None, step: Optional[float] = None, total_steps: Optional[float] = None,
          group_size: Optional[int] = None, config: ConfigLike = None,
          device: Optional[jax.Device] = None) -> dict[str, np.ndarray]:
    """Rewards of completions against targets; numpy float64 arrays of len(completions).

    completions: list[str]. targets: [{"label": "real" | "generated", "boxes": [[x1, y1, x2, y2], ...]}] in the
    completions' frame, one per completion or one per contiguous group (see `prepare_batch`).
    stage: "alpha" | "beta" | "gamma" | "continuous" (then give step= and total_steps=); `weights` overrides it.
    relaxation: "paper" (min(1, eta * IoU)) | "authors" (IoU ** power); defaults from `config` (a reward YAML's
    path, or its values as `load_config` returns them; None: configs/rewards.yaml).
    Keys: "total", "format" (0/1), "label" (0/1), "iou" (raw matched IoU in [0, 1]), "iou_relaxed" (R_G).
    Runs on the CPU in float64 unless `device` is given.
    """
    if isinstance(completions, (str, bytes)):  # a str is a sequence too: each character would be scored
        raise TypeError("completions must be a list of strings, got one string: pass [completion]")
    if isinstance(targets, Mapping):
        raise TypeError("targets must be a list of {'label': ..., 'boxes': ...} dicts, got one dict: pass [target]")
    completions, targets = list(completions), list(targets)  # (a generator had "no len()")
    cfg = load_config(config)
    w = resolve_weights(stage, weights, step, total_steps, config)
    relax = relax_params(relaxation or cfg.get("relaxation", "paper"),
                         float(cfg.get("eta", 1.1) if eta is None else eta),
                         float(cfg.get("power", 1.1) if power is None else power))
    n_c = len(completions)
    if n_c == 0:
        if len(targets):
            raise ValueError(f"0 completions for {len(targets)} targets")
        return {k: np.zeros(0) for k in KEYS}
    batch = prepare_batch(completions, targets, group_size)
    n_t = len(targets)
    device = device or _cpu_device()
    with jax.enable_x64(True):
        args = jax.device_put((*batch.values(), w.as_array(), relax), device)
        out = reward_core(*args)
        return {k: np.asarray(out[k])[:n_t].reshape(n_c).astype(np.float64) for k in KEYS}
