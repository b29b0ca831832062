"""GRPO rollout throughput: fxjax's group sampler vs HF `generate(num_return_sequences=G)`, on the CPU or a GPU.

One command. The parent builds a random-weight HF Qwen2.5-VL (bench/forward.py's configs), saves it, and
writes P left-padded prompts (one 448x448 photo each through fxjax.process_image, text around it; row i
starts 2*i tokens later, so the rows really are padded). One child process per framework loads the same
checkpoint and samples G completions of exactly N new tokens per prompt:

  torch  model.generate(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids,
         do_sample=True, num_return_sequences=G, max_new_tokens=N, temperature, top_k, top_p) under
         torch.inference_mode (sdpa attention). HF repeats each prompt G times before the prefill, so the
         vision encoder and the prompt's prefill run G times per prompt.
  fxjax  fxjax.model.generate.sample_groups(model, model.prepare(...), num_generations=G, max_new_tokens=N,
         ...): one jitted call; each prompt prefilled once (one vision pass per image), its KV cache
         repeated to its G rows, then one while_loop decodes all P*G rows. Timed end to end: model.prepare
         on the host + the jitted call + fetching the tokens. The first call (trace + compile) is reported
         on its own.

Both sides get an EOS id the model cannot sample (= vocab size), so every row generates exactly N tokens
(checked); new tokens/s = P * G * N / seconds per call.

    python bench/grpo_rollout.py             # mid config (~154M), 4 prompts x G 8, 128 new tokens
    python bench/grpo_rollout.py --small     # tiny config, smoke run
    python bench/grpo_rollout.py --device cuda --dtype bfloat16 --config 3b --text-layers 12 --vision-depth 8 \
        --prompts 8 --num-generations 8 --new-tokens 256   # a GPU: 3B layer shapes, a third of its depth

With --device cuda both children run on the GPU (the parent builds the checkpoint and prompts on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import forward as fw  # noqa: E402  (bench/forward.py: configs, model and batch builders, worker runner)
from forward import cpu_model, machine_line  # noqa: E402

PAD_ID = 0  # the configs' pad_token_id


def left_padded_prompts(batch: int, text_tokens: int, image_side: int, vocab: int) -> dict:
    """bench/forward.py's batch with row i shortened by 2*i leading text tokens (at most 7: the text before
    <vision_start> is 8 tokens) and left-padded back to the common length."""
    data = fw.make_batch(batch, text_tokens, image_side, vocab)
    for i in range(batch):
        cut = min(2 * i, 7)
        if cut:
            for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                row = data[key][i]
                fill = PAD_ID if key == "input_ids" else 0
                data[key][i] = np.concatenate([np.full(cut, fill, row.dtype), row[cut:]])
    return data


def timed_calls(fn, iters: int) -> dict:
    """Wall and process-CPU seconds of `iters` calls, and the 1-min load average before each."""
    out = {"wall": [], "cpu": [], "load": []}
    for i in range(iters):
        out["load"].append(os.getloadavg()[0])
        c0, t0 = time.process_time(), time.perf_counter()
        fn(i + 1)
        out["wall"].append(time.perf_counter() - t0)
        out["cpu"].append(time.process_time() - c0)
    return out


def worker_torch(workdir: Path, args) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    device, dtype = fw.torch_setup(args)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(workdir / "ckpt"), dtype=dtype, attn_implementation="sdpa").eval().to(device)
    data = {k: torch.from_numpy(v).to(device) for k, v in np.load(workdir / "batch.npz").items()}
    length = data["input_ids"].shape[1]
    shapes = []

    def call(seed: int):
        torch.manual_seed(seed)
        hf.model.rope_deltas = None  # HF caches rope deltas on the model between calls
        with torch.inference_mode():
            out = hf.generate(**data, do_sample=True, num_return_sequences=args.num_generations,
                              max_new_tokens=args.new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, eos_token_id=args.eos_id, pad_token_id=PAD_ID)
        if device.type == "cuda":
            torch.cuda.synchronize()  # generate's last step may still be queued
        shapes.append([out.shape[0], out.shape[1] - length])

    t0 = time.perf_counter()
    call(0)
    first = time.perf_counter() - t0
    times = timed_calls(call, args.iters)
    return dict(times=times, first_s=first, generated=shapes, version=f"torch {torch.__version__}",
                threads=torch.get_num_threads())


def worker_fxjax(workdir: Path, args) -> dict:
    import jax

    import fxjax
    from fxjax.model.generate import sample_groups

    fw.jax_setup(args)
    # attention "auto", as `fxjax sft` / `fxjax grpo` run it (model.attention's default): cuDNN on a GPU in
    # bfloat16 or float16, XLA on a CPU (from_pretrained alone keeps the model's XLA attention)
    model = fxjax.from_pretrained(workdir / "ckpt", dtype=args.dtype).use_attention("auto")
    data = dict(np.load(workdir / "batch.npz"))
    shapes = []

    def call(seed: int):
        inputs = model.prepare(data["input_ids"], data["attention_mask"], data["pixel_values"],
                               data["image_grid_thw"])
        out = sample_groups(model, inputs, num_generations=args.num_generations, max_new_tokens=args.new_tokens,
                            temperature=args.temperature, top_k=args.top_k or None,
                            top_p=args.top_p if args.top_p < 1.0 else None, rng=jax.random.key(seed),
                            eos_token_ids=(args.eos_id,), pad_token_id=PAD_ID)
        tokens = np.asarray(out.tokens)
        shapes.append([tokens.shape[0], int(out.num_steps), int(np.asarray(out.truncated).sum())])

    t0 = time.perf_counter()
    call(0)
    first = time.perf_counter() - t0
    times = timed_calls(call, args.iters)
    return dict(times=times, first_s=first, compile_s=first - min(times["wall"]), generated=shapes,
                version=f"jax {jax.__version__} ({jax.devices()[0].platform})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="N new tokens per completion (exactly)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0, help="0: off (configs/grpo.yaml's default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="1.0: off (configs/grpo.yaml's default)")
    ap.add_argument("--iters", type=int, default=2, help="timed calls after the first (median and min reported)")
    ap.add_argument("--small", action="store_true", help="tiny config for a quick smoke run")
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--text-tokens", type=int, default=64, help="non-image prompt tokens per sample")
    fw.add_worker_args(ap)
    fw.add_device_args(ap)
    ap.add_argument("--eos-id", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return fw.run_worker(args, {"torch": worker_torch, "fxjax": worker_fxjax})

    name = fw.config_name(args)
    vocab = fw.CONFIGS[name][0]["vocab_size"]
    tmp = tempfile.TemporaryDirectory(prefix="fxjax_bench_rollout_")
    workdir = Path(tmp.name)
    hf = fw.build_hf_model(name)
    n_params = sum(p.numel() for p in hf.parameters())
    fw.save_checkpoint(hf, workdir / "ckpt", args.dtype)
    del hf
    data = left_padded_prompts(args.prompts, args.text_tokens, args.image_side, vocab)
    np.savez(workdir / "batch.npz", **data)
    p, length = data["input_ids"].shape
    g, n = args.num_generations, args.new_tokens
    new_tokens = p * g * n
    print(f"config {name}: {n_params / 1e6:.1f}M params, vocab {vocab}, {args.dtype} on {args.device}; {p} prompts "
          f"x {length} tokens (left-padded; {int(data['mm_token_type_ids'][0].sum())} image tokens each, one "
          f"{args.image_side}px photo), G = {g}, {n} new tokens each = {new_tokens} new tokens per call; temperature "
          f"{args.temperature}, top_k {args.top_k or 'off'}, top_p {args.top_p if args.top_p < 1 else 'off'}; "
          f"EOS id {vocab} (unreachable)")
    print(fw.accelerator_line(args))
    passthrough = ["--prompts", str(p), "--num-generations", str(g), "--new-tokens", str(n), "--temperature",
                   str(args.temperature), "--top-k", str(args.top_k), "--top-p", str(args.top_p), "--iters",
                   str(args.iters), "--cores", str(args.cores), "--eos-id", str(vocab), *fw.device_passthrough(args)]
    results = fw.run_children(__file__, workdir, passthrough, env=fw.child_env(args))
    tmp.cleanup()

    tr, fx = results["torch"], results["fxjax"]
    for label, res, ok in (("torch", tr, lambda s: s == [p * g, n]), ("fxjax", fx, lambda s: s[:2] == [p * g, n])):
        if not all(ok(s) for s in res["generated"]):
            raise SystemExit(f"{label} did not generate exactly {n} tokens for {p * g} rows every call: "
                             f"{res['generated']}")
    print(f"{tr['version']} ({tr['threads']} threads); {fx['version']}; every call generated {p * g} rows x {n} "
          f"tokens on both sides")
    print(f"first call: torch {tr['first_s']:.1f}s; fxjax {fx['first_s']:.1f}s, of which trace + compile "
          f"~{fx['compile_s']:.1f}s (excluded from the figures below)")
    print()
    title = f"rollout ({p} prompts x G {g} x {n} tokens)"
    print(f"| {title:<40} | {'median s':>8} | {'min s':>7} | {'cpu s':>6} | {'new tok/s':>9} | {'load avg':>9} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 9}|{'-' * 8}|{'-' * 11}|{'-' * 11}|")
    for label, res in (("HF generate (torch)", tr), ("fxjax sample_groups (e2e)", fx)):
        med, best = statistics.median(res["times"]["wall"]), min(res["times"]["wall"])
        cpu = statistics.median(res["times"]["cpu"])
        load = res["times"]["load"]
        print(f"| {label:<40} | {med:>8.2f} | {best:>7.2f} | {cpu:>6.1f} | {new_tokens / med:>9.1f} | "
              f"{min(load):>4.1f}-{max(load):<4.1f} |")
    tr_med = statistics.median(tr["times"]["wall"])
    fx_med = statistics.median(fx["times"]["wall"])
    ratio = tr_med / fx_med
    ratio_min = min(tr["times"]["wall"]) / min(fx["times"]["wall"])
    cpu_ratio = statistics.median(tr["times"]["cpu"]) / statistics.median(fx["times"]["cpu"])
    print(f"\nfxjax / HF new tokens/s: {ratio:.2f}x (min-based {ratio_min:.2f}x; process CPU seconds ratio "
          f"{cpu_ratio:.2f}x); target >= 5x")
    print(machine_line() + " (after)")
    print(json.dumps(dict(
        bench="grpo_rollout", config=name, device=args.device, dtype=args.dtype, params_m=round(n_params / 1e6, 1),
        prompts=p, num_generations=g, new_tokens=n, prompt_length=length, cpu=cpu_model(), cores=os.cpu_count(),
        pinned_cores=args.cores,
        torch=tr["version"], jax=fx["version"],
        torch_s=[round(x, 3) for x in tr["times"]["wall"]], fxjax_s=[round(x, 3) for x in fx["times"]["wall"]],
        torch_tokens_per_s=round(new_tokens / tr_med, 2), fxjax_tokens_per_s=round(new_tokens / fx_med, 2),
        ratio=round(ratio, 3), ratio_min=round(ratio_min, 3), cpu_ratio=round(cpu_ratio, 3),
        fxjax_first_call_s=round(fx["first_s"], 2), fxjax_compile_s=round(fx["compile_s"], 2),
        torch_first_call_s=round(tr["first_s"], 2),
        load_torch=tr["times"]["load"], load_fxjax=fx["times"]["load"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
