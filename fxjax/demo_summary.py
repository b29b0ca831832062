"""The demo's summary lines: the held-out table (a row per phase), the training reward's trend within each
GRPO stage (first vs last third, least-squares slope with its standard error) and the held-out reward at
each stage's start and end. Pure functions of the metrics `fxjax.demo.run_demo` collects."""

from __future__ import annotations

from fxjax.rewards.stages import STAGES  # the reward config's three presets, in the paper's order

__all__ = ["STAGES", "held_out_stage_rewards", "phase_table", "slope_with_error", "stage_trends"]


def phase_table(rows: list[tuple[str, dict]]) -> str:
    cols = [("format rate", "format_rate", "{:.0%}"), ("verdict acc.", "accuracy", "{:.0%}"),
            ("F1 generated", "f1", "{:.3f}"), ("mean IoU gen.", "mean_iou", "{:.3f}"),
            ("gamma reward", "gamma_reward", "{:+.3f}")]
    lines = ["| held-out (" + str(rows[0][1].get("examples", "?")) + " images) | "
             + " | ".join(c[0] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, m in rows:
        cells = [fmt.format(m[key]) if m.get(key) is not None else "n/a" for _, key, fmt in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_trends(history: list[dict]) -> str:
    """Per stage: mean training reward of its first and last third of steps, the least-squares slope per
    step with its standard error, and whether the slope is more than two standard errors from 0 (one
    step's reward is noisy: a few prompts x G samples, so a stage of 10 steps shows a trend only when the
    policy moves more than the sampling does: where it does not, the text says from what rise over the stage
    a steady rise would show, about twice the scatter of a step's mean for 10 steps)."""
    import numpy as np

    parts = []
    for stage in dict.fromkeys(h["stage"] for h in history):  # (in the order run: any stage names)
        r = np.array([float(h["reward/total_mean"]) for h in history if h["stage"] == stage])
        r = r[np.isfinite(r)]  # (a step whose reward is NaN tells nothing of the trend)
        if not r.size:
            continue
        k = max(1, r.size // 3)
        text = f"{stage} {r[:k].mean():+.2f} -> {r[-k:].mean():+.2f}"
        if r.size > 2:
            slope, se = slope_with_error(r)
            verdict = "rises" if slope > 2 * se else "falls" if slope < -2 * se else "no trend beyond noise"
            if verdict.startswith("no trend"):  # how large a steady rise over the stage this noise would let show
                verdict += f"; a steady rise would show from {2 * se * (r.size - 1):+.2f} over the stage"
            text += f" (slope {_per_step(slope, '+')} +/- {_per_step(se, '')}/step: {verdict})"
        parts.append(text)
    return "; ".join(parts)


def _per_step(value: float, sign: str) -> str:
    """A slope (or its error) per step: 3 decimals, or 3 digits in e-notation below 0.001 (a long stage's
    slope of 3e-5 read "+0.000 +/- 0.000"); below 1e-9 (a straight line's rounding: 2e-16) 0."""
    value = 0.0 if abs(value) < 1e-9 else value
    return f"{value:{sign}.3f}" if value == 0 or abs(value) >= 0.001 else f"{value:{sign}.2e}"


def slope_with_error(values) -> tuple[float, float]:
    """Least-squares slope of values over their index and its standard error (n >= 3)."""
    import numpy as np

    x = np.arange(values.size, dtype=np.float64)
    slope, intercept = np.polyfit(x, values, 1)
    residuals = values - (slope * x + intercept)
    se = float(np.sqrt(residuals @ residuals / (values.size - 2) / np.sum((x - x.mean()) ** 2)))
    return float(slope), se


def held_out_stage_rewards(evals: list[tuple[str, dict]]) -> str:
    """Per GRPO stage: the mean held-out reward under that stage's weights at the stage's start (the
    evaluation before it: after SFT for alpha) and at its end. The same images, greedy decoding: unlike a
    training step's mean reward, it does not depend on which prompts a step drew. `evals` in run order
    (before SFT, after SFT, after each stage); a run that stopped early has fewer."""
    parts = []
    for (_, start), (_, end), stage in zip(evals[1:], evals[2:], STAGES):
        a, b = start["stage_rewards"][stage], end["stage_rewards"][stage]
        parts.append(f"{stage} {a:+.3f} -> {b:+.3f} ({'rises' if b > a else 'falls' if b < a else 'flat'})")
    return "; ".join(parts)
