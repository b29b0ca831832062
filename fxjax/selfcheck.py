"""`fxjax selfcheck`: the whole import/forward/decode/export path on a tiny model, no downloads."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np


def _photo():
    """A real photograph that ships with scikit-image."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut())


def _prompt_ids(cfg, n_image_tokens: int) -> np.ndarray:
    """A chat-shaped prompt with one image; text ids are arbitrary (the tiny model has no tokenizer)."""
    rng = np.random.RandomState(0)
    text = lambda n: list(rng.randint(1000, 20000, size=n))  # noqa: E731
    ids = text(4) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_image_tokens
    ids += [cfg.vision_end_token_id] + text(12)
    return np.array([ids], dtype=np.int64)


def run_selfcheck(workdir: Path | None = None) -> int:
    """0 if every check passed, else 1. Without `workdir`, a temporary directory removed afterwards (also
    when a step raises)."""
    if workdir is not None:
        return _run_checks(Path(workdir))
    with tempfile.TemporaryDirectory(prefix="fxjax-selfcheck-") as tmp:
        return _run_checks(Path(tmp))


def _run_checks(workdir: Path) -> int:
    import jax

    from fxjax import from_pretrained, process_image, save_pretrained
    from fxjax.hf_checkpoint import iter_tensors, weight_files
    from fxjax.model_init import init_model, parameter_counts
    from fxjax.model.generate import greedy_generate

    rows: list[tuple[str, str, float]] = []

    def step(name: str, fn):
        start = time.perf_counter()
        result, detail = fn()
        rows.append((name, detail, time.perf_counter() - start))
        print(f"  {name:<28s} {detail}  ({rows[-1][2]:.1f}s)", flush=True)
        return result

    print(f"fxjax selfcheck on {jax.devices()[0].platform}, writing to {workdir}")
    model = step("init tiny preset", lambda: (m := init_model("tiny", seed=0),
                                              f"{parameter_counts(m)['total']:,} parameters"))
    src = step("save in HF layout", lambda: (d := save_pretrained(model, workdir / "hf"),
                                             f"{len(list(d.glob('*.safetensors')))} shard(s)"))
    model = step("from_pretrained", lambda: (from_pretrained(src, dtype="float32"), "loaded"))
    pv, grid = step("process_image (astronaut)", lambda: (r := process_image(_photo(), max_pixels=448 * 448),
                                                          f"grid {r[1][0].tolist()}, {r[0].shape[0]} patches"))
    ids = _prompt_ids(model.config, int(np.prod(grid[0]) // model.config.vision.merge_unit))
    logits = step("forward", lambda: (lg := np.asarray(model(ids, pixel_values=pv, image_grid_thw=grid)),
                                      f"logits {lg.shape}, finite={bool(np.isfinite(lg).all())}"))
    # no stop tokens: all 16 are decoded through the KV cache, and all 16 are checked below
    out = step("greedy decode (16 tokens)", lambda: (
        g := greedy_generate(model, ids, pixel_values=pv, image_grid_thw=grid, max_new_tokens=16, eos_token_ids=()),
        f"new tokens {g[0, ids.shape[1]:].tolist()}"))
    agree = step("decode vs uncached forward", lambda: _decode_agrees(model, out, ids.shape[1], pv, grid))

    def roundtrip():
        dst = save_pretrained(model, workdir / "export")
        before = {n: t for n, _, t in iter_tensors(weight_files(src))}
        after = {n: t for n, _, t in iter_tensors(weight_files(dst))}
        same = before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
        return same, f"{len(after)} tensors, bit-exact={same}"

    exact = step("export round trip", roundtrip)
    ok = bool(np.isfinite(logits).all()) and agree and exact
    print(f"selfcheck {'passed' if ok else 'FAILED'}: every decoded token is the uncached forward's argmax={agree}")
    return 0 if ok else 1


def _decode_agrees(model, out: np.ndarray, prompt_len: int, pixel_values, grid) -> tuple[bool, str]:
    """Each token greedy decoding wrote through the KV cache is the argmax of one uncached forward over the
    prompt and the tokens before it (up to float rounding: within 1e-4 of the maximum logit)."""
    logits = np.asarray(model(out[:, :-1], pixel_values=pixel_values, image_grid_thw=grid))[0, prompt_len - 1:]
    new = out[0, prompt_len:]
    gap = logits.max(axis=-1) - logits[np.arange(len(new)), new]
    bad = [i for i, g in enumerate(gap) if not g <= 1e-4]
    detail = (f"all {len(new)} tokens agree" if not bad else
              f"token {bad[0]} ({int(new[bad[0]])}) is {gap[bad[0]]:.3g} below the forward's maximum logit "
              f"({len(bad)} of {len(new)} disagree)")
    return not bad, detail
