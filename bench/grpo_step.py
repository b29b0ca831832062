"""One whole GRPO step (rollout + rewards + log-probs + update): `fxjax grpo`'s loop vs TRL's GRPOTrainer + peft.

One command, fp32 on the CPU unless --device / --dtype say otherwise. The parent builds a random-weight HF
Qwen2.5-VL (bench/forward.py's configs, with Qwen's real vocabulary of 151,936 and its special-token ids: both
sides tokenize with the Qwen2.5-VL tokenizer), the offline Qwen tokenizer (fxjax.data.tokenizer), and P native
records, one 448x448 photo each (scikit-image photographs; every other record "generated" with one box, so
every reward term has a target). One child process per framework trains LoRA (r 8, alpha 32, dropout 0.05,
all-linear: vision, merger and decoder) for 1 + --iters steps of P prompts x G completions of N tokens
(temperature 1, top-k and top-p off, loss grpo, beta 0.04, AdamW lr 1e-4, grad clip 1.0), with activation
recomputation on both sides (each one's default: TRL's gradient_checkpointing, fxjax's model.remat full;
without it TRL's policy pass at the mid config, 2 prompts x G 8, took more than 22 GB and was killed on a
24 GB machine; --no-remat turns it off on both):

  fxjax  `fxjax.train.grpo.run_grpo` itself (what `fxjax grpo` runs) on a GRPOConfig with one stage of
         1 + iters steps. Per step: group sampling (each prompt prefilled once, KV cache shared by its G rows),
         rewards (fxjax.rewards.score) and group advantages on the host, the reference log-probs (LoRA off),
         one jitted update; both passes run each prompt through the decoder once (grpo.share_prompts, the
         default; --full-sequences adds a run with G full sequences per prompt, as TRL). The figure is the
         loop's own per-step `step_time` metric; the first step (which compiles) is reported on its own.
  TRL    `trl.GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset, processing_class,
         peft_config=LoraConfig(...))` with a reward function that calls fxjax.rewards.score on the
         completions. The dataset is what TRL wants for VLMs: "prompt" in conversational format (the same
         system prompt and user template as fxjax's pipeline) and an "image" column. The figure is the wall
         time between consecutive `on_step_end` callbacks (the whole step: data, generation, rewards, log-probs,
         backward, optimizer); the first step is reported on its own.

Each process's CPU model, the load average (sampled every 2 s during the steps) and the versions are printed
with the figures; a JSON line carries them too.

    python bench/grpo_step.py              # mid config (~154M + Qwen's vocabulary), 4 prompts x G 8, 128 tokens
    python bench/grpo_step.py --small      # tiny config, smoke run
    python bench/grpo_step.py --only fxjax --full-sequences   # fxjax's default (shared prompts) vs full sequences
    python bench/grpo_step.py --device cuda --dtype bfloat16 --config 3b --text-layers 12 --vision-depth 8 \
        --loss-chunk 1024   # a GPU (both children; TRL with bf16=True), Qwen2.5-VL-3B's layer shapes

On a GPU the machine needs trl and datasets (with dill and multiprocess) besides fxjax's own dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

import forward as fw  # noqa: E402  (bench/forward.py: configs, model builder, worker runner)
from forward import cpu_model, machine_line  # noqa: E402

QWEN_VOCAB = 151936
QWEN_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                   vision_end_token_id=151653)
PAD_ID, EOS_ID = 151643, 151645  # <|endoftext|>, <|im_end|>
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "retina")
LORA = dict(rank=8, alpha=32.0, dropout=0.05)
LEARNING_RATE, MAX_GRAD_NORM, SEED = 1e-4, 1.0, 0


class LoadSampler:
    """The 1-minute load average every `every` seconds on a daemon thread (for 'load next to each figure')."""

    def __init__(self, every: float = 2.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> list[float]:
        s = self.samples or [os.getloadavg()[0]]
        return [round(min(s), 2), round(statistics.mean(s), 2), round(max(s), 2)]


# ---------------------------------------------------------------------------------------------------------
# Parent: checkpoint, tokenizer, records.


def build_checkpoint(name: str, out: Path, tokenizer_dir: Path, dtype: str = "float32") -> int:
    """bench/forward.py's `name` config with Qwen's vocabulary and special-token ids; returns its parameter count."""
    import shutil

    text, vision = fw.CONFIGS[name]
    fw.CONFIGS[name] = ({**text, "vocab_size": QWEN_VOCAB}, vision)
    fw.TOKENS = dict(QWEN_TOKENS)  # fw.hf_config reads the module global at call time
    hf = fw.build_hf_model(name)
    for cfg in (hf.config.text_config, hf.generation_config):
        cfg.bos_token_id, cfg.pad_token_id, cfg.eos_token_id = PAD_ID, PAD_ID, EOS_ID
    fw.save_checkpoint(hf, out, dtype)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return sum(p.numel() for p in hf.parameters())


def write_records(folder: Path, n: int, side: int) -> Path:
    """n native records, one side x side photo each; odd records 'generated' with one artefact box."""
    import skimage.data
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        photo = np.asarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
        if photo.ndim == 2:
            photo = np.stack([photo] * 3, -1)
        img = Image.fromarray(photo[..., :3].astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
        rel = f"images/{i:03d}.png"
        img.save(folder / rel)
        record = {"id": f"bench-{i}", "image": rel, "label": "generated" if i % 2 else "real",
                  "regions": [{"bbox": [side // 8, side // 4, side // 2, side // 2], "caption": "smeared texture"}]
                  if i % 2 else [], "tags": [], "reasoning": "benchmark record"}
        lines.append(json.dumps(record))
    path = folder / "train.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------------------------------------------------
# fxjax: the real loop.


def worker_fxjax(workdir: Path, args) -> dict:
    import jax

    from fxjax.grpo_config import grpo_from_dict
    from fxjax.train.grpo import run_grpo

    fw.jax_setup(args)
    side = args.image_side
    cfg = grpo_from_dict({
        "model": {"path": str(workdir / "ckpt"), "dtype": args.dtype, "remat": "none" if args.no_remat else "full"},
        "lora": {**LORA, "target_modules": "all-linear", "init_seed": SEED},
        "data": {"train_files": [str(workdir / "data" / "train.jsonl")], "tokenizer": str(workdir / "ckpt"),
                 "min_pixels": side * side, "max_pixels": side * side, "batch_size": args.prompts,
                 "shuffle": False, "seed": SEED},
        "optim": {"learning_rate": LEARNING_RATE, "schedule": "constant", "warmup_steps": 0,
                  "max_grad_norm": MAX_GRAD_NORM},
        "train": {"loss_chunk": args.loss_chunk, "progress_bar": False, "tensorboard": False,
                  "output_dir": str(workdir / ("fxjax_out_full" if args.full else "fxjax_out")), "seed": SEED},
        "checkpoint": {"every": 0, "async_save": True, "resume": False},
        "eval": {"at_end": False},
        "grpo": {"num_generations": args.num_generations, "max_completion_length": args.new_tokens,
                 "temperature": 1.0, "top_k": 0, "top_p": 1.0, "loss_type": "grpo", "beta": args.beta,
                 "seed": SEED, "share_prompts": not args.full},
        "stages": [{"name": "alpha", "steps": 1 + args.iters}],
    })
    t0 = time.perf_counter()
    with LoadSampler() as load:
        result = run_grpo(cfg, log=lambda text: print(text, file=sys.stderr, flush=True))
    total = time.perf_counter() - t0
    h = result.history
    keys = ("step_time", "rollout_time", "update_time", "completion_length_mean", "loss", "kl",
            "reward/total_mean", "update_tokens_per_s")
    steps = [{k: float(s[k]) for k in keys if k in s} for s in h]
    for s in steps:
        s["tokens"] = s.pop("update_tokens_per_s") * s["update_time"]  # prompt + completion tokens in the update
    return dict(steps=steps, run_s=total, load=load.summary(), peak_mb=fw.peak_mb("jax", args),
                version=f"jax {jax.__version__} ({jax.devices()[0].platform})",
                trainable=sum(int(x.size) for x in jax.tree.leaves(result.params)))


# ---------------------------------------------------------------------------------------------------------
# TRL: GRPOTrainer with peft.


def qwen_processor(tokenizer_dir: Path, side: int):
    """A Qwen2.5-VL processor built offline: the Qwen tokenizer + chat template and the PIL image processor
    at exactly side x side pixels. No video processor: the installed transformers needs torchvision for
    Qwen's and rejects None in its class check, which this subclass skips for absent components."""
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fxjax.data.tokenizer import CHAT_TEMPLATE

    class ProcessorWithoutVideo(Qwen2_5_VLProcessor):
        def check_argument_for_proper_class(self, attribute_name, arg):
            if arg is None:
                return None
            return super().check_argument_for_proper_class(attribute_name, arg)

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    images = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)
    return ProcessorWithoutVideo(image_processor=images, tokenizer=tok, video_processor=None,
                                 chat_template=CHAT_TEMPLATE)


def trl_dataset(records_path: Path):
    """TRL's VLM layout: conversational "prompt" (fxjax's system prompt and the template fxjax's pipeline
    picks for the record in epoch 0), an "image" column, and the rewards' targets as extra columns."""
    from datasets import Dataset
    from PIL import Image

    from fxjax.data.prompts import SYSTEM_PROMPT, USER_TEMPLATES, pick_template

    rows = []
    for i, line in enumerate(records_path.read_text().splitlines()):
        rec = json.loads(line)
        rows.append(dict(
            prompt=[{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": USER_TEMPLATES[pick_template(SEED, i, 0)]}],
            image=Image.open(records_path.parent / rec["image"]).convert("RGB"),
            label=rec["label"], boxes=[r["bbox"] for r in rec["regions"]]))
    return Dataset.from_list(rows)


def worker_torch(workdir: Path, args) -> dict:
    import torch
    import trl
    from peft import LoraConfig
    from transformers import Qwen2_5_VLForConditionalGeneration, TrainerCallback

    from fxjax import rewards

    device, dtype = fw.torch_setup(args)
    weights = rewards.load_stage("alpha")

    def reward_fn(prompts, completions, label, boxes, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        targets = [{"label": lab, "boxes": np.asarray(b, np.float64).reshape(-1, 4)} for lab, b in zip(label, boxes)]
        return [float(x) for x in rewards.score(texts, targets, weights=weights)["total"]]

    stamps: list[float] = []
    loads: list[float] = []

    class Stamps(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())
            loads.append(os.getloadavg()[0])

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())
            loads.append(os.getloadavg()[0])
            print(f"trl: step {len(stamps) - 1} took {stamps[-1] - stamps[-2]:.1f}s (load {loads[-1]:.1f})",
                  file=sys.stderr, flush=True)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(workdir / "ckpt"), dtype=dtype,
                                                                attn_implementation="sdpa")
    rows = args.prompts * args.num_generations
    config = trl.GRPOConfig(
        output_dir=str(workdir / "trl_out"), per_device_train_batch_size=rows, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.new_tokens, temperature=1.0, top_k=0,
        top_p=1.0, beta=args.beta, loss_type="grpo", learning_rate=LEARNING_RATE, lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM, max_steps=1 + args.iters, use_cpu=device.type == "cpu",
        bf16=dtype == torch.bfloat16, fp16=False,
        gradient_checkpointing=not args.no_remat, logging_steps=1, report_to="none", save_strategy="no", seed=SEED,
        disable_tqdm=True,
        # Every completion N tokens long, as on the fxjax side (a random model rarely samples <|im_end|>).
        generation_kwargs={"min_new_tokens": args.new_tokens})
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward_fn, args=config, train_dataset=trl_dataset(workdir / "data" / "train.jsonl"),
        processing_class=qwen_processor(workdir / "ckpt", args.image_side),
        peft_config=LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear"),
        callbacks=[Stamps()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    with LoadSampler() as load:
        trainer.train()
    total = time.perf_counter() - t0
    logs = [e for e in trainer.state.log_history if "loss" in e and "step_time" in e]
    steps = []
    prev_tokens = 0.0
    for i, e in enumerate(logs):
        steps.append(dict(step_time=stamps[i + 1] - stamps[i], trl_step_time=float(e["step_time"]),
                          completion_length_mean=float(e["completions/mean_length"]), loss=float(e["loss"]),
                          kl=float(e.get("kl", float("nan"))), tokens=float(e["num_tokens"]) - prev_tokens,
                          **{"reward/total_mean": float(e["reward"])}))
        prev_tokens = float(e["num_tokens"])
    return dict(steps=steps, run_s=total, load=load.summary(), step_loads=loads, trainable=trainable,
                version=f"torch {torch.__version__}, trl {trl.__version__}, {torch.get_num_threads()} threads, "
                        f"{device}",
                peak_mb=fw.peak_mb("torch", args))


# ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="N = max_completion_length")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--iters", type=int, default=1, help="timed steps after the first")
    ap.add_argument("--small", action="store_true", help="tiny config for a quick smoke run")
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--loss-chunk", type=int, default=48,
                    help="fxjax: completion tokens per float32 lm_head chunk (48 x 151,936 x 4 bytes < 32 MB: "
                         "stays in the heap on a CPU, see sft_step.py)")
    ap.add_argument("--no-remat", action="store_true",
                    help="no activation recomputation (TRL gradient_checkpointing=False, fxjax model.remat=none)")
    ap.add_argument("--only", choices=("torch", "fxjax"), help="run one side only (no ratio)")
    ap.add_argument("--full-sequences", action="store_true",
                    help="also run fxjax with grpo.share_prompts false (G full prompt + completion sequences per "
                         "prompt in the update, as TRL) and print the default's ratio to it")
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # the worker's share_prompts false
    fw.add_worker_args(ap)
    fw.add_device_args(ap)
    args = ap.parse_args(argv)

    if args.worker:
        return fw.run_worker(args, {"torch": worker_torch, "fxjax": worker_fxjax})

    from fxjax.data.tokenizer import cached_qwen_tokenizer

    name = fw.config_name(args)
    tmp = tempfile.TemporaryDirectory(prefix="fxjax_bench_grpo_")
    workdir = Path(tmp.name)
    tokenizer_dir = cached_qwen_tokenizer(Path(tempfile.gettempdir()) / "fxjax_bench_cache")
    n_params = build_checkpoint(name, workdir / "ckpt", tokenizer_dir, args.dtype)
    write_records(workdir / "data", args.prompts, args.image_side)
    p, g, n = args.prompts, args.num_generations, args.new_tokens
    print(f"config {name} with Qwen's vocabulary ({QWEN_VOCAB}): {n_params / 1e6:.1f}M params, {args.dtype} on "
          f"{args.device}; LoRA r 8, alpha 32, dropout 0.05, all-linear; {p} prompts x G {g} x {n} new tokens, one "
          f"{args.image_side}x{args.image_side} photo per prompt; loss grpo, beta {args.beta}, AdamW lr "
          f"{LEARNING_RATE}, clip {MAX_GRAD_NORM}; recompute activations: {'no' if args.no_remat else 'yes'}; 1 + {args.iters} steps per side")
    print(fw.accelerator_line(args))
    passthrough = ["--prompts", str(p), "--num-generations", str(g), "--new-tokens", str(n), "--beta", str(args.beta),
                   "--iters", str(args.iters), "--image-side", str(args.image_side), "--loss-chunk",
                   str(args.loss_chunk), "--cores", str(args.cores), *fw.device_passthrough(args),
                   *(["--no-remat"] if args.no_remat else [])]
    env = fw.child_env(args)
    results = fw.run_children(__file__, workdir, passthrough, env,
                              workers=tuple(w for w in ("torch", "fxjax") if not args.only or w == args.only))
    if args.full_sequences and args.only != "torch":
        results["fxjax-full"] = fw.run_child(__file__, "fxjax", workdir, passthrough + ["--full"], env)
    tmp.cleanup()

    labels = {"torch": "TRL GRPOTrainer + peft (torch)", "fxjax": "fxjax grpo loop (run_grpo)",
              "fxjax-full": "fxjax, full sequences"}
    print("; ".join(r["version"] for r in results.values()) + "; trainable LoRA parameters: "
          + ", ".join(f"{w} {r['trainable']:,}" for w, r in results.items()))
    print()
    print(f"| {'one GRPO step':<32} | {'first s':>8} | {'median s':>8} | {'min s':>7} | {'tokens/step':>11} | "
          f"{'compl. len':>10} | {'load min/mean/max':>17} |")
    print(f"|{'-' * 34}|{'-' * 10}|{'-' * 10}|{'-' * 9}|{'-' * 13}|{'-' * 12}|{'-' * 19}|")
    med = {}
    for worker, r in results.items():
        timed = [s["step_time"] for s in r["steps"][1:]]
        med[worker] = statistics.median(timed)
        last = r["steps"][-1]
        print(f"| {labels[worker]:<32} | {r['steps'][0]['step_time']:>8.1f} | {med[worker]:>8.1f} | {min(timed):>7.1f} | "
              f"{last['tokens']:>11.0f} | {last['completion_length_mean']:>10.1f} | "
              f"{'/'.join(f'{x:.1f}' for x in r['load']):>17} |")
    for worker, r in results.items():
        if worker.startswith("fxjax"):
            s = r["steps"][-1]
            print(f"{worker} last step: rollout (sampling + rewards) {s['rollout_time']:.1f}s, update (reference "
                  f"log-probs + jitted step) {s['update_time']:.1f}s; first step {r['steps'][0]['step_time']:.1f}s "
                  f"includes tracing + compiling")
    ratio = med["torch"] / med["fxjax"] if "torch" in med and "fxjax" in med else None
    if ratio is not None:
        print(f"\nfxjax / TRL steps per second: {ratio:.2f}x (target >= 3x)")
    memory = "peak RSS MB" if args.device == "cpu" else "peak GPU MB"
    print(f"{memory}: " + ", ".join(f"{w} {r['peak_mb']:.0f}" for w, r in results.items()))
    shared = med["fxjax-full"] / med["fxjax"] if "fxjax-full" in med and "fxjax" in med else None
    if shared is not None:
        print(f"fxjax (shared prompts) / fxjax with full sequences, steps per second: {shared:.2f}x"
              + (f"; full sequences / TRL: {med['torch'] / med['fxjax-full']:.2f}x" if "torch" in med else ""))
    print(machine_line() + " (after)")
    print(json.dumps(dict(
        bench="grpo_step", config=name, device=args.device, dtype=args.dtype, vocab=QWEN_VOCAB,
        params_m=round(n_params / 1e6, 1), prompts=p, num_generations=g, new_tokens=n, beta=args.beta, cpu=cpu_model(),
        cores=os.cpu_count(), pinned_cores=args.cores, versions={w: r["version"] for w, r in results.items()},
        steps={w: r["steps"] for w, r in results.items()}, median_step_s=med, load={w: r["load"] for w, r in results.items()},
        ratio=None if ratio is None else round(ratio, 3), shared_ratio=None if shared is None else round(shared, 3))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
