"""Forward throughput: fxjax (JAX/Flax NNX) vs transformers (torch) Qwen2.5-VL, fp32 on the CPU.

One process builds a random-weight HF model, saves it with save_pretrained, loads the same weights
with fxjax.from_pretrained, runs both on the same batch (one real photo per sample + text), checks
the logits agree, and times:

  torch      model(**inputs) under torch.inference_mode (sdpa attention, use_cache=False)
  fxjax jit  the jitted forward on prepared device inputs (model.prepare once), block_until_ready
  fxjax e2e  model(input_ids, ...) as a user calls it: host prep + transfer + jitted forward

and, with --breakdown, the vision encoder (incl. merger) and the decoder + lm_head on their own.

    python bench/forward.py                  # mid-size (~150M) config, batch 4
    python bench/forward.py --small --iters 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Token ids inside the vocab (the real ones, 151652.., lie beyond a 32k vocab).
TOKENS = dict(image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993)

# name -> (text, vision) architecture. "mid": ~150M parameters, Qwen2.5-VL proportions scaled down.
CONFIGS = {
    "mid": (
        dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=2, mrope_section=(8, 12, 12)),
        dict(depth=8, hidden_size=512, intermediate_size=1368, num_heads=8, window_size=112,
             fullatt_block_indexes=(3, 7)),
    ),
    "small": (
        dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6)),
        dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, window_size=112,
             fullatt_block_indexes=(1,)),
    ),
}


def hf_config(name: str):
    from transformers import Qwen2_5_VLConfig

    text, vision = CONFIGS[name]
    text = dict(text)
    section = list(text.pop("mrope_section"))
    return Qwen2_5_VLConfig(
        text_config=dict(**text, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                         tie_word_embeddings=False),
        vision_config=dict(**{**vision, "fullatt_block_indexes": list(vision["fullatt_block_indexes"])},
                           out_hidden_size=text["hidden_size"], hidden_act="silu"),
        tie_word_embeddings=False,
        **TOKENS,
    )


def build_hf_model(name: str, seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config(name)).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so every tensor matters.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname or "ln_q" in pname:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_batch(batch: int, text_tokens: int, image_side: int, vocab: int, seed: int = 0):
    """Each sample: text, <vision_start>, image pads, <vision_end>, text; `text_tokens` non-image tokens
    (the two vision markers included). Images: skimage's astronaut at image_side^2, flipped/rotated per
    sample so the four differ, through fxjax.process_image."""
    import skimage.data
    from PIL import Image

    import fxjax

    photo = Image.fromarray(skimage.data.astronaut()).resize((image_side, image_side), Image.Resampling.BICUBIC)
    variants = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
                photo.transpose(Image.Transpose.FLIP_TOP_BOTTOM), photo.transpose(Image.Transpose.ROTATE_90)]
    rng = np.random.RandomState(seed)
    pixel_rows, grids, rows = [], [], []
    prefix = 8
    suffix = text_tokens - prefix - 2
    for i in range(batch):
        pv, grid = fxjax.process_image(variants[i % len(variants)])
        pixel_rows.append(pv)
        grids.append(grid)
        n_image = int(grid.prod()) // 4
        ids = np.concatenate([
            rng.randint(3, vocab - 100, prefix), [TOKENS["vision_start_token_id"]],
            np.full(n_image, TOKENS["image_token_id"]), [TOKENS["vision_end_token_id"]],
            rng.randint(3, vocab - 100, suffix)])
        rows.append(ids)
    input_ids = np.stack(rows).astype(np.int64)
    return dict(
        input_ids=input_ids,
        attention_mask=np.ones_like(input_ids),
        pixel_values=np.concatenate(pixel_rows).astype(np.float32),
        image_grid_thw=np.concatenate(grids).astype(np.int64),
        mm_token_type_ids=(input_ids == TOKENS["image_token_id"]).astype(np.int64),
    )


def timed(fn, iters: int) -> list[float]:
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) one")
    ap.add_argument("--small", action="store_true", help="tiny config for a quick smoke run")
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--text-tokens", type=int, default=64, help="non-image tokens per sample (incl. 2 vision markers)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--breakdown", action="store_true", help="also time vision and decoder+lm_head separately")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import fxjax
    from model.qwen2_5_vl import _forward_logits

    torch.set_num_threads(args.threads)
    name = "small" if args.small else "mid"

    t0 = time.perf_counter()
    hf = build_hf_model(name)
    n_params = sum(p.numel() for p in hf.parameters())
    n_vision = sum(p.numel() for p in hf.model.visual.parameters())
    tmp = tempfile.TemporaryDirectory(prefix="fxjax_bench_")
    hf.save_pretrained(tmp.name)
    model = fxjax.from_pretrained(tmp.name, dtype="float32")
    build_s = time.perf_counter() - t0

    data = make_batch(args.batch, args.text_tokens, args.image_side, CONFIGS[name][0]["vocab_size"])
    b, length = data["input_ids"].shape
    tokens = b * length
    n_image_tokens = int(data["mm_token_type_ids"].sum())
    t_inputs = {k: torch.from_numpy(v) for k, v in data.items()}

    print(f"config {name}: {n_params / 1e6:.1f}M params (vision {n_vision / 1e6:.1f}M, "
          f"text+lm_head {(n_params - n_vision) / 1e6:.1f}M)")
    print(f"  text  {CONFIGS[name][0]}\n  vision {CONFIGS[name][1]}")
    print(f"batch {b} x {length} tokens ({n_image_tokens // b} image + {length - n_image_tokens // b} text per sample; "
          f"{data['pixel_values'].shape[0]} patches, grid {data['image_grid_thw'][0].tolist()} per image)")
    print(f"torch {torch.__version__} threads={torch.get_num_threads()}, jax {jax.__version__} "
          f"{jax.devices()[0].platform}, cores={os.cpu_count()}; build+save+load {build_s:.1f}s")

    # ---- torch
    def torch_forward():
        with torch.inference_mode():
            return hf(**t_inputs, use_cache=False).logits

    t0 = time.perf_counter()
    ref = torch_forward().numpy()
    torch_first = time.perf_counter() - t0
    for _ in range(args.warmup):
        torch_forward()
    torch_times = timed(torch_forward, args.iters)

    # ---- fxjax, jitted on prepared device inputs
    prep_args = (data["input_ids"], data["attention_mask"], data["pixel_values"], data["image_grid_thw"])
    t0 = time.perf_counter()
    inputs = model.prepare(*prep_args)
    prep_s = time.perf_counter() - t0
    dev_inputs = jax.device_put(inputs)

    def jax_forward():
        return _forward_logits(model, dev_inputs).block_until_ready()

    t0 = time.perf_counter()
    out = np.asarray(jax_forward())
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        jax_forward()
    jax_times = timed(jax_forward, args.iters)

    def jax_e2e():
        return model(*prep_args).block_until_ready()

    jax_e2e()
    e2e_times = timed(jax_e2e, args.iters)

    err = rel_err(out, ref)
    compile_s = first_s - statistics.median(jax_times)
    argmax_agree = float((out.argmax(-1) == ref.argmax(-1)).mean())

    rows = [("torch (sdpa, inference_mode)", torch_times),
            ("fxjax jitted forward", jax_times),
            ("fxjax model(...) end to end", e2e_times)]

    # ---- breakdown: vision encoder (+merger) and decoder + lm_head
    if args.breakdown:
        grid_t = t_inputs["image_grid_thw"]
        pv_t = t_inputs["pixel_values"]

        def torch_vision():
            with torch.inference_mode():
                return hf.model.visual(pv_t, grid_thw=grid_t).pooler_output

        with torch.inference_mode():
            embeds = hf.model.get_input_embeddings()(t_inputs["input_ids"])
            image_embeds = torch_vision()
            mask = (t_inputs["input_ids"] == TOKENS["image_token_id"])[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image_embeds)
            pos = hf.model.compute_3d_position_ids(
                input_ids=t_inputs["input_ids"], image_grid_thw=grid_t, video_grid_thw=None,
                second_per_grid_ts=None, inputs_embeds=embeds, attention_mask=t_inputs["attention_mask"],
                cache=None, mm_token_type_ids=t_inputs["mm_token_type_ids"])

        def torch_decoder():
            with torch.inference_mode():
                h = hf.model.language_model(inputs_embeds=embeds, position_ids=pos,
                                            attention_mask=t_inputs["attention_mask"], use_cache=False)
                return hf.lm_head(h.last_hidden_state)

        @nnx.jit
        def jax_vision_fn(m, vision):
            return m.visual(vision)

        @nnx.jit
        def jax_decoder_fn(m, x, position_ids, attention_mask):
            return m.logits(m.decoder(x, position_ids, attention_mask)[0])

        x_dev = nnx.jit(lambda m, i: m.embed(i))(model, dev_inputs).block_until_ready()

        def jax_vision():
            return jax_vision_fn(model, dev_inputs.vision).block_until_ready()

        def jax_decoder():
            return jax_decoder_fn(model, x_dev, dev_inputs.position_ids, dev_inputs.attention_mask).block_until_ready()

        for fn in (torch_vision, torch_decoder, jax_vision, jax_decoder):
            for _ in range(1 + args.warmup):
                fn()
        rows += [("torch vision encoder + merger", timed(torch_vision, args.iters)),
                 ("fxjax vision encoder + merger", timed(jax_vision, args.iters)),
                 ("torch decoder + lm_head", timed(torch_decoder, args.iters)),
                 ("fxjax decoder + lm_head", timed(jax_decoder, args.iters))]

    print()
    print(f"logits {out.shape}: rel err fxjax vs torch {err:.2e} (max|diff| / max(1, max|ref|)), "
          f"argmax agreement {argmax_agree * 100:.1f}%")
    print(f"torch first call {torch_first:.2f}s; fxjax first jitted call {first_s:.2f}s "
          f"(trace+compile ~{compile_s:.2f}s excluded from timings), model.prepare (host) {prep_s * 1e3:.1f} ms")
    print()
    header = f"{'measurement':34s} {'median s':>9s} {'min s':>8s} {'tokens/s':>10s} {'vs torch':>9s}"
    print(header)
    print("-" * len(header))
    torch_med = statistics.median(torch_times)
    for label, times in rows:
        med = statistics.median(times)
        full = not ("vision" in label or "decoder" in label)
        tps = f"{tokens / med:10.1f}" if full else f"{'':10s}"
        ref_med = torch_med
        if "vision" in label or "decoder" in label:
            ref_label = "torch " + label.split(" ", 1)[1]
            ref_med = statistics.median(dict(rows)[ref_label])
        print(f"{label:34s} {med:9.3f} {min(times):8.3f} {tps} {ref_med / med:8.2f}x")
    print()
    print(f"ratio fxjax/torch throughput: jitted {torch_med / statistics.median(jax_times):.2f}, "
          f"end to end {torch_med / statistics.median(e2e_times):.2f}  (>= 1.0: fxjax faster)")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
