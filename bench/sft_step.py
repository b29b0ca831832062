"""One LoRA SFT step: fxjax (JAX, train.step) vs transformers + peft (torch), on the CPU or an NVIDIA GPU.

One command. The parent builds a random-weight HF Qwen2.5-VL (bench/forward.py's configs), saves it and
one batch (one real photo per sample, text around it, the last `--target-tokens` tokens of each sample
labelled as the assistant span). One child process per framework loads the same checkpoint, attaches LoRA
(r 8, alpha 32, all-linear: vision, merger and decoder Linears; dropout 0) and times full training steps:

  torch   peft.get_peft_model; model(**inputs, labels=labels).loss.backward(); clip_grad_norm_(1.0);
          AdamW.step(); zero_grad()  (transformers computes full [B, L, vocab] logits and the loss on them;
          with --hf-logits-to-keep only the labelled span's, `logits_to_keep`: the same work as fxjax's)
  fxjax   the jitted step of `fxjax sft` (train.step.make_train_step): chunked cross-entropy on the
          supervised tokens only, clipping, AdamW; state donated; batch prepared on the host beforehand

tokens/s = batch x sequence length (image tokens included) / step time (median of --iters after
--warmup untimed steps; fxjax's first step compiles and is reported on its own). Peak memory is the
child's peak resident set size (model, optimiser, activations, runtime), from getrusage.

    python bench/sft_step.py                  # mid config (~150M), batch 4, 5 timed steps (~3-5 min on 2 cores)
    python bench/sft_step.py --small --iters 2
    python bench/sft_step.py --vocab 151936   # the real vocabulary (the lm_head dominates)
    python bench/sft_step.py --vocab 151936 --hf-logits-to-keep   # ... transformers' lm_head on the labels only
    python bench/sft_step.py --loop           # the whole `fxjax sft` loop: host time per step, in line vs overlapped
    python bench/sft_step.py --device cuda --dtype bfloat16 --config 3b --text-layers 12 --vision-depth 8 \
        --batch 8 --image-side 448 --loss-chunk 1024   # a GPU: Qwen2.5-VL-3B's layer shapes, a third of its depth

With --device cuda both children run on the GPU (the parent builds the checkpoint and the batch on the CPU);
peak memory is then each child's peak allocated GPU memory (torch.cuda.max_memory_allocated, JAX's
peak_bytes_in_use), and float32 means float32 on both sides (no TF32).

--loop runs `train.sft.run_sft` itself (demo images, the offline Qwen tokenizer, the small config with the
real vocabulary) twice in one process: with overlap=False (each batch decoded, tokenised and built after
the previous step's metrics were fetched: the loop before #14 item 6) and with the default overlap (the
next batch built in a background thread, a step's metrics fetched after the next step is dispatched). It
reports the host time per step (the loop's wait for its batch, plus placing it) and the median step time
of metrics.jsonl (steps 2..N; overlapped, completion to completion).
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

import forward as fw  # noqa: E402  (bench/forward.py: configs, model and batch builders)


def _labels(input_ids: np.ndarray, targets: int) -> np.ndarray:
    labels = np.full_like(input_ids, -100)
    labels[:, -targets:] = input_ids[:, -targets:]
    return labels


def time_steps(step, warmup: int, iters: int) -> tuple[float, float, list[float]]:
    """(first step's loss, its seconds incl. any compile, seconds of each of `iters` steps after `warmup`)."""
    t = time.perf_counter()
    first_loss = step()
    first = time.perf_counter() - t
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return first_loss, first, times


def worker_torch(workdir: Path, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    device, dtype = fw.torch_setup(args)
    data = dict(np.load(workdir / "batch.npz"))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(workdir / "ckpt"), dtype=dtype,
                                                                attn_implementation="sdpa").to(device)
    # peft keeps the adapters in float32 on a bfloat16 model (autocast_adapter_dtype), as fxjax does.
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    inputs = {k: torch.as_tensor(v).to(device) for k, v in data.items() if k != "labels"}
    labels = torch.as_tensor(data["labels"]).to(device)
    if args.hf_logits_to_keep:  # the lm_head on the labelled span and the position before it only (the loss
        # shifts by one): the same loss, the work fxjax's chunked loss does
        first = int((labels != -100).any(0).nonzero()[0])
        keep = labels.shape[1] - first + 1
        inputs["logits_to_keep"], labels = keep, labels[:, -keep:]

    def step():
        out = model(**inputs, labels=labels, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    first_loss, first, times = time_steps(step, args.warmup, args.iters)  # float(loss) waits for the GPU
    return dict(times=times, first_s=first, first_loss=first_loss, peak_mb=fw.peak_mb("torch", args),
                trainable=sum(p.numel() for p in params), version=f"torch {torch.__version__}",
                loadavg=list(os.getloadavg()), param_dtypes=sorted({str(p.dtype) for p in params}))


def worker_fxjax(workdir: Path, args) -> dict:
    import jax
    from flax import nnx

    import fxjax
    from fxjax.config_sections import OptimSection
    from fxjax.model.lora import LoRAConfig, apply_lora
    from fxjax.train.batching import build_step_batch
    from fxjax.train.optimizer import make_optimizer
    from fxjax.train.step import TrainState, make_train_step, split_model

    fw.jax_setup(args)
    data = dict(np.load(workdir / "batch.npz"))
    # attention "auto", as `fxjax sft` / `fxjax grpo` run it (model.attention's default): cuDNN on a GPU in
    # bfloat16 or float16, XLA on a CPU (from_pretrained alone keeps the model's XLA attention)
    model = fxjax.from_pretrained(workdir / "ckpt", dtype=args.dtype).use_attention("auto")
    apply_lora(model, LoRAConfig(rank=8, alpha=32.0, dropout=0.0), rngs=nnx.Rngs(0))
    model.train()
    graphdef, params, base, rest = split_model(model)
    tx, schedule = make_optimizer(OptimSection(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                                               max_grad_norm=1.0), 1000)
    state = TrainState.fresh(params, tx, seed=0)
    step_fn = make_train_step(graphdef, tx, schedule, loss_chunk=args.loss_chunk, remat=args.remat,
                              remat_vision=args.remat)
    host = {k: v for k, v in data.items() if k != "mm_token_type_ids"}
    t = time.perf_counter()
    batch = build_step_batch([host], model.config, pad_id=0)
    batch = jax.device_put(batch)
    prep = time.perf_counter() - t

    def step():
        nonlocal state
        state, metrics = step_fn(state, base, rest, batch)
        return float(jax.block_until_ready(metrics["loss"]))

    first_loss, first, times = time_steps(step, args.warmup, args.iters)
    return dict(times=times, first_s=first, first_loss=first_loss, peak_mb=fw.peak_mb("jax", args), prep_s=prep,
                trainable=sum(int(x.size) for x in jax.tree.leaves(params)),
                version=f"jax {jax.__version__} ({jax.devices()[0].platform})", loadavg=list(os.getloadavg()),
                param_dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(params)}))


def _loop_model(directory: Path, tokenizer_dir: Path) -> Path:
    """The small config with the Qwen tokenizer's vocabulary and special-token ids, in HF layout."""
    import shutil

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = fw.hf_config("small")
    config.text_config.vocab_size = 151936
    for key, value in dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                           vision_end_token_id=151653).items():
        setattr(config, key, value)
    config.text_config.bos_token_id = config.text_config.pad_token_id = 151643
    config.text_config.eos_token_id = 151645
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).eval().save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def run_loop(args) -> int:
    """--loop: run_sft in line vs overlapped; host time per step and step time."""
    from fxjax.data.demo_data import make_demo_data
    from fxjax.data.tokenizer import cached_qwen_tokenizer
    from fxjax.train.metrics import read_metrics
    from fxjax.train.sft import run_sft
    from fxjax.train_config import load_sft_config

    tmp = tempfile.TemporaryDirectory(prefix="fxjax_bench_loop_")
    root = Path(tmp.name)
    tokenizer_dir = cached_qwen_tokenizer(Path(tempfile.gettempdir()) / "fxjax_bench_cache")  # as grpo_step.py
    files = make_demo_data(root / "data", n=max(8, args.batch * (args.iters + 2)), seed=0, test_fraction=0.0,
                           min_side=args.image_side, max_side=2 * args.image_side)
    model_dir = _loop_model(root / "model", tokenizer_dir)
    print(fw.machine_line())
    print(f"the sft loop: config small (vocab 151936), fp32, LoRA r 8; batch {args.batch}, demo images "
          f"{args.image_side}-{2 * args.image_side} px (max_pixels {args.loop_pixels}), {args.iters} steps")
    rows, logged = {}, {}
    for label, overlap in (("in line (before)", False), ("overlapped (after)", True)):
        out = root / ("overlap" if overlap else "inline")
        cfg = load_sft_config(None, [
            f"model.path={model_dir}", "model.dtype=float32", "lora.rank=8", "lora.alpha=32",
            f"data.train_files=[{files['train']}]", f"data.max_pixels={args.loop_pixels}",
            f"data.batch_size={args.batch}", "data.max_length=2048", f"train.steps={args.iters}",
            f"train.loss_chunk={args.loss_chunk}", "train.progress_bar=false", "train.tensorboard=false",
            f"train.output_dir={out}", "checkpoint.every=0", f"checkpoint.dir={out / 'ckpt'}",
            "eval.at_end=false"], log=lambda text: None)
        result = run_sft(cfg, log=lambda text: None, overlap=overlap)
        records = [r for r in read_metrics(out) if r["kind"] == "train"]
        logged[label] = [{k: v for k, v in r.items() if k not in ("time", "step_time", "tokens_per_s")}
                         for r in records]
        times = [r["step_time"] for r in records][1:]
        rows[label] = (result.host_seconds / result.steps, statistics.median(times), result.final_loss)
    tmp.cleanup()
    same = logged["in line (before)"] == logged["overlapped (after)"]
    print()
    print(f"| {'sft loop':<20} | {'host s/step':>11} | {'median step s':>13} | {'final loss':>10} |")
    print(f"|{'-' * 22}|{'-' * 13}|{'-' * 15}|{'-' * 12}|")
    for label, (host, step, loss) in rows.items():
        print(f"| {label:<20} | {host:>11.3f} | {step:>13.3f} | {loss:>10.5f} |")
    print(f"\nmetrics.jsonl per step (loss, grad norm, lr, tokens, skipped) identical in both modes: {same}")
    return 0 if same else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5, help="timed steps (median and min reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first")
    ap.add_argument("--small", action="store_true", help="tiny config for a quick smoke run")
    ap.add_argument("--vocab", type=int, default=None, help="override the config's vocabulary size")
    ap.add_argument("--image-side", type=int, default=224, help="one image per sample, side in pixels")
    ap.add_argument("--text-tokens", type=int, default=256, help="non-image tokens per sample")
    ap.add_argument("--target-tokens", type=int, default=192, help="labelled (assistant) tokens per sample")
    ap.add_argument("--loss-chunk", type=int, default=48,
                    help="fxjax: supervised tokens per lm_head chunk (on a CPU keep chunk x vocab x 4 bytes under 32 MB)")
    ap.add_argument("--remat", default="none", help="fxjax: remat policy of decoder layers / vision blocks")
    ap.add_argument("--hf-logits-to-keep", action="store_true",
                    help="transformers runs its lm_head on the labelled span only (logits_to_keep), as fxjax does")
    ap.add_argument("--loop", action="store_true", help="time the whole sft loop in line vs overlapped (fxjax only)")
    ap.add_argument("--loop-pixels", type=int, default=200704, help="--loop: data.max_pixels of the images")
    fw.add_worker_args(ap)
    fw.add_device_args(ap)
    args = ap.parse_args(argv)

    if args.worker:
        return fw.run_worker(args, {"torch": worker_torch, "fxjax": worker_fxjax})
    if args.loop:
        return run_loop(args)

    name = fw.config_name(args)
    if args.vocab:
        text, vision = fw.CONFIGS[name]
        fw.CONFIGS[name] = ({**text, "vocab_size": args.vocab}, vision)
    vocab = fw.CONFIGS[name][0]["vocab_size"]
    tmp = tempfile.TemporaryDirectory(prefix="fxjax_bench_sft_")
    workdir = Path(tmp.name)
    hf = fw.build_hf_model(name)
    n_params = sum(p.numel() for p in hf.parameters())
    fw.save_checkpoint(hf, workdir / "ckpt", args.dtype)
    del hf
    data = fw.make_batch(args.batch, args.text_tokens, args.image_side, vocab)
    data["labels"] = _labels(data["input_ids"], args.target_tokens)
    np.savez(workdir / "batch.npz", **data)
    b, length = data["input_ids"].shape
    tokens = b * length
    n_image = int(data["mm_token_type_ids"].sum()) // b
    print(f"config {name}: {n_params / 1e6:.1f}M params, vocab {vocab}, {args.dtype} on {args.device}; LoRA r 8, "
          f"alpha 32, all-linear (vision + merger + decoder), AdamW, grad clip 1.0")
    print(f"batch {b} x {length} tokens ({n_image} image + {length - n_image} text per sample, one "
          f"{args.image_side}px image each), {args.target_tokens} labelled tokens per sample")
    print(fw.accelerator_line(args))  # the CPU model (and the GPU) with every figure
    passthrough = ["--iters", str(args.iters), "--warmup", str(args.warmup), "--cores", str(args.cores),
                   "--loss-chunk", str(args.loss_chunk), "--remat", args.remat, *fw.device_passthrough(args),
                   *(["--hf-logits-to-keep"] if args.hf_logits_to_keep else [])]
    results = fw.run_children(__file__, workdir, passthrough, env=fw.child_env(args))
    tmp.cleanup()
    tr, fx = results["torch"], results["fxjax"]
    print(f"{tr['version']}; {fx['version']}; trainable LoRA parameters: torch {tr['trainable']:,}, "
          f"fxjax {fx['trainable']:,}")
    print(f"first step: torch {tr['first_s']:.2f}s (loss {tr['first_loss']:.4f}); fxjax {fx['first_s']:.2f}s incl. "
          f"trace + compile (loss {fx['first_loss']:.4f}); fxjax host batch prep {fx['prep_s'] * 1e3:.0f} ms")
    print(f"1-min load average while timing: torch {tr['loadavg'][0]:.2f}, fxjax {fx['loadavg'][0]:.2f}; trainable "
          f"dtypes: torch {tr['param_dtypes']}, fxjax {fx['param_dtypes']}")
    print()
    memory = "peak RSS MB" if args.device == "cpu" else "peak GPU MB"
    print(f"| {'one LoRA SFT step':<32} | {'median s':>8} | {'min s':>7} | {'tokens/s':>9} | {memory:>11} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 9}|{'-' * 11}|{'-' * 13}|")
    med = {}
    for label, r in (("transformers + peft (torch)", tr), ("fxjax (jitted step)", fx)):
        med[label] = statistics.median(r["times"])
        print(f"| {label:<32} | {med[label]:>8.3f} | {min(r['times']):>7.3f} | {tokens / med[label]:>9.0f} | "
              f"{r['peak_mb']:>11.0f} |")
    ratio = med["transformers + peft (torch)"] / med["fxjax (jitted step)"]
    print(f"\nfxjax / torch throughput: {ratio:.2f}x (target >= 1.5x); peak memory fxjax / torch: "
          f"{fx['peak_mb'] / tr['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
