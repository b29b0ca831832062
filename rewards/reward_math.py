"""The numeric half of the rewards (docs/rewards.md): pure, jitted, vectorised over batch x group.

Shapes (N targets, G completions per target, P predicted boxes, T ground-truth boxes, all padded):
    pred [N, G, P, 4], pred_mask [N, G, P], gt [N, T, 4], gt_mask [N, T], is_real [N],
    format_ok [N, G], label_ok [N, G], weights [6] (RewardWeights order), relax [3] = (paper?, eta, power).
The function is dtype-generic; `rewards.score` runs it in float64 on the CPU so that distance ties and
IoUs come out exactly as a float64 plain-Python implementation computes them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def box_area(b):
    return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])


def box_iou(a, b):
    """Plain IoU of broadcastable boxes [..., 4] (x1, y1, x2, y2); 0 where the union is not positive.

    The intersection's width and height are clamped at 0 separately (not their product, unlike the
    authors' code), so the result lies in [0, 1] for any finite boxes, inverted ones included (clipped at 1:
    float32 rounds two equal boxes far from the origin to 1.0000001).
    """
    iw = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
    ih = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
    inter = iw * ih
    union = box_area(a) + box_area(b) - inter
    positive = union > 0
    return jnp.where(positive, jnp.minimum(inter / jnp.where(positive, union, 1), 1), 0)


def centre_dist2(a, b):
    """Squared centre-to-centre distance (same order as the Euclidean distance, ties included)."""
    dx = (a[..., 0] + a[..., 2]) / 2 - (b[..., 0] + b[..., 2]) / 2
    dy = (a[..., 1] + a[..., 3]) / 2 - (b[..., 1] + b[..., 3]) / 2
    return dx * dx + dy * dy


def matched_iou(pred, pred_mask, gt, gt_mask):
    """Greedy matching in output order -> sum of matched IoUs / number of GT boxes, shape [N, G].

    Each valid predicted box k = 0, 1, ... takes the not-yet-matched GT box with the smallest centre
    distance (ties: the lowest GT index, as Python's `min` over GT indices gives); once every GT box is
    taken, later predictions match nothing. No GT boxes -> 0.
    """
    iou = box_iou(pred[:, :, :, None, :], gt[:, None, None, :, :])  # [N, G, P, T]
    dist = centre_dist2(pred[:, :, :, None, :], gt[:, None, None, :, :])
    n, g, _, t = iou.shape
    avail0 = jnp.broadcast_to(gt_mask[:, None, :], (n, g, t))
    inf = jnp.asarray(jnp.inf, dist.dtype)
    # (a distance whose square overflows stays below the taken boxes' inf: else argmin took box 0 again)
    dist = jnp.minimum(dist, jnp.finfo(dist.dtype).max)

    def step(carry, xs):
        avail, total = carry
        d_k, iou_k, valid_k = xs  # [N, G, T], [N, G, T], [N, G]
        j = jnp.argmin(jnp.where(avail, d_k, inf), axis=-1)  # first minimum
        hit = valid_k & avail.any(axis=-1)
        picked = jnp.take_along_axis(iou_k, j[..., None], axis=-1)[..., 0]
        total = total + jnp.where(hit, picked, 0)
        avail = avail & ~((jnp.arange(t) == j[..., None]) & hit[..., None])
        return (avail, total), None

    xs = (jnp.moveaxis(dist, 2, 0), jnp.moveaxis(iou, 2, 0), jnp.moveaxis(pred_mask, 2, 0))
    (_, total), _ = jax.lax.scan(step, (avail0, jnp.zeros((n, g), iou.dtype)), xs)
    n_gt = gt_mask.sum(axis=-1).astype(iou.dtype)[:, None]
    return jnp.where(n_gt > 0, total / jnp.maximum(n_gt, 1), 0)


def relax_iou(iou, relax):
    """R_G: min(1, eta * IoU) when relax[0] (the paper), else IoU ** power (the authors' code)."""
    return jnp.where(relax[0] > 0.5, jnp.minimum(1, relax[1] * iou), jnp.power(iou, relax[2]))


def rewards_fn(pred, pred_mask, gt, gt_mask, is_real, format_ok, label_ok, weights, relax):
    """All reward parts for a batch x group of completions, each [N, G]."""
    raw = matched_iou(pred, pred_mask, gt, gt_mask)
    raw = jnp.clip(jnp.where(is_real[:, None], 1, raw), 0, 1)  # real ground truth: IoU term 1
    r_g = relax_iou(raw, relax)
    total = (weights[0] + weights[1] * r_g + jnp.where(label_ok, weights[2], weights[3])
             + jnp.where(format_ok, weights[4], weights[5]))
    return {"total": total, "format": format_ok.astype(raw.dtype), "label": label_ok.astype(raw.dtype),
            "iou": raw, "iou_relaxed": r_g}


reward_core = jax.jit(rewards_fn)
