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
    import jax

    from fxjax import from_pretrained, process_image, save_pretrained
    from fxjax.hf_checkpoint import iter_tensors, weight_files
    from fxjax.model_init import init_model, parameter_counts
    from fxjax.model.generate import greedy_generate

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fxjax-selfcheck-")
        workdir = Path(tmp.name)
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
    out = step("greedy decode (16 tokens)", lambda: (
        g := greedy_generate(model, ids, pixel_values=pv, image_grid_thw=grid, max_new_tokens=16),
        f"new tokens {g[0, ids.shape[1]:].tolist()}"))
    agree = int(out[0, ids.shape[1]]) == int(np.argmax(logits[0, -1]))

    def roundtrip():
        dst = save_pretrained(model, workdir / "export")
        before = {n: t for n, _, t in iter_tensors(weight_files(src))}
        after = {n: t for n, _, t in iter_tensors(weight_files(dst))}
        same = before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
        return same, f"{len(after)} tensors, bit-exact={same}"

    exact = step("export round trip", roundtrip)
    ok = bool(np.isfinite(logits).all()) and agree and exact
    print(f"selfcheck {'passed' if ok else 'FAILED'}: first decoded token matches forward argmax={agree}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if ok else 1
