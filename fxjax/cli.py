"""The `fxjax` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_init(args: argparse.Namespace) -> int:
    from fxjax.hf_checkpoint import save_pretrained
    from fxjax.model_init import init_model, parameter_counts

    model = init_model(args.preset, seed=args.seed, dtype=args.dtype)
    out = save_pretrained(model, args.out)
    what = "config and weights"
    if args.tokenizer:
        from fxjax.data.tokenizer import FORMAT_MARKER_IDS, build_qwen_tokenizer

        ids_needed = max(FORMAT_MARKER_IDS.values()) + 1
        if model.config.text.vocab_size < ids_needed:
            raise SystemExit(f"fxjax init: preset {args.preset} has vocab_size {model.config.text.vocab_size}, fewer "
                             f"than the Qwen2.5-VL tokenizer's {ids_needed} ids; pass --no-tokenizer")
        build_qwen_tokenizer(out)
        what += ", and the Qwen2.5-VL tokenizer"
    print(f"wrote random-init {args.preset} ({parameter_counts(model)['total']:,} parameters) to {out}: {what}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from fxjax.hf_config import load_config
    from fxjax.model_init import abstract_parameter_counts
    from fxjax.presets import load_preset

    source = Path(args.model)
    cfg = load_config(source)[0] if source.is_dir() else load_preset(args.model)
    t, v = cfg.text, cfg.vision
    print(f"text:   {t.num_hidden_layers} layers, hidden {t.hidden_size}, heads {t.num_attention_heads}/"
          f"{t.num_key_value_heads} kv, mlp {t.intermediate_size}, vocab {t.vocab_size}, "
          f"mrope {list(t.mrope_section)}, tied {cfg.tie_word_embeddings}")
    print(f"vision: {v.depth} blocks, hidden {v.hidden_size}, heads {v.num_heads}, mlp {v.intermediate_size}, "
          f"window {v.window_size}px, full attention at {list(v.fullatt_block_indexes)}")
    print(f"tokens: image {cfg.image_token_id}, vision start/end {cfg.vision_start_token_id}/"
          f"{cfg.vision_end_token_id}, eos {list(cfg.eos_token_id)}")
    for part, n in abstract_parameter_counts(cfg).items():
        print(f"  {part:13s} {n:>16,d} parameters")
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from fxjax.selfcheck import run_selfcheck

    return run_selfcheck(Path(args.workdir) if args.workdir else None)


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from fxjax.data.demo_data import make_demo_data

    files = make_demo_data(args.out, n=args.n, seed=args.seed, test_fraction=args.test_fraction,
                           min_side=args.min_side, max_side=args.max_side, overwrite=args.overwrite,
                           multiple=args.multiple, fingerprint=args.fingerprint,
                           max_regions=args.max_regions)
    counts = {split: sum(1 for _ in open(path, encoding="utf-8")) for split, path in files.items()}
    print(f"wrote {args.n} demo images to {Path(args.out) / 'images'}; "
          + ", ".join(f"{files[s]} ({counts[s]} records)" for s in files))
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from fxjax.train_config import load_sft_config

    cfg = load_sft_config(args.config, overrides=args.set or [])
    # Multi-process start-up must come before anything touches a JAX backend.
    from fxjax import distributed

    distributed.initialize({k: v for k, v in vars(cfg.distributed).items() if v is not None})
    from fxjax.train.sft import NonFiniteError, run_sft

    try:
        result = run_sft(cfg)
    except NonFiniteError as err:
        print(f"fxjax sft: error: {err}", file=sys.stderr)
        return 3
    if result.preempted:
        print(f"fxjax sft: preempted at step {result.steps}/{result.total_steps}; checkpoint in "
              f"{result.checkpoint_dir}", file=sys.stderr)
        return 0
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    print(f"fxjax sft: {result.steps} steps in {result.seconds:.0f}s, final loss {loss}; checkpoints in "
          f"{result.checkpoint_dir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fxjax.demo import run_demo

    return run_demo(out=Path(args.out), steps=args.steps, n_images=args.n, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxjax",
        description="Grounded AI-generated-image detection with Qwen2.5-VL in JAX/Flax: "
                    "HF-exact model, checkpoint import/export, LoRA training.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("selfcheck", help="end-to-end check of this install on a tiny model (no downloads)",
                       description="Builds the tiny preset with random weights, writes it in HF layout, loads "
                                   "it back, runs a real photograph through the processor, the forward pass and "
                                   "cached greedy decoding, and checks that export reproduces every tensor.")
    p.add_argument("--workdir", help="where to write the checkpoints (default: a temporary directory)")
    p.set_defaults(func=_cmd_selfcheck)

    p = sub.add_parser("init", help="write a random-initialised model in HF layout",
                       description="Write a Qwen2.5-VL with random weights as an HF checkpoint directory "
                                   "(config.json, sharded safetensors, generation_config.json).")
    p.add_argument("out", help="output directory")
    p.add_argument("--preset", default="tiny", help="model preset (tiny, 3b, 7b, 32b, 72b) or a YAML path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype")
    p.add_argument("--no-tokenizer", dest="tokenizer", action="store_false",
                   help="skip writing the Qwen2.5-VL tokenizer (tokenizer.json + chat template, built offline from "
                        "the BPE ranks in dashscope) next to the weights")
    p.set_defaults(func=_cmd_init)

    p = sub.add_parser("info", help="describe a checkpoint directory or preset",
                       description="Print the architecture and parameter counts of an HF checkpoint directory "
                                   "or a preset, without loading weights.")
    p.add_argument("model", help="HF checkpoint directory, preset name or preset YAML")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("make-demo-data", help="write a small native-format dataset made from scikit-image photos",
                       description="Real images are random crops, scales and flips of the photographs that ship "
                                   "with scikit-image; generated ones get 1 to --max-regions regions rewritten by procedural "
                                   "artefact generators, with captions and tags. Deterministic for a seed.")
    p.add_argument("out", help="output directory (images/, train.jsonl, test.jsonl)")
    p.add_argument("--n", type=int, default=1000, help="number of images (half real, half generated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.1, help="share of the images in test.jsonl")
    p.add_argument("--min-side", type=int, default=192, help="smallest longer side of an image, pixels")
    p.add_argument("--max-side", type=int, default=384, help="largest longer side of an image, pixels")
    p.add_argument("--multiple", type=int, default=1,
                   help="round both sides to multiples of this (28: the image processor keeps the pixels as they are)")
    p.add_argument("--fingerprint", type=float, default=0.0,
                   help="amplitude (0-255 levels) of a period-2 up-sampling checkerboard over every generated image "
                        "(0: none; `fxjax demo` uses 6)")
    p.add_argument("--max-regions", type=int, default=3, help="most artefact regions per generated image (1-8)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    p.set_defaults(func=_cmd_make_demo_data)
    p = sub.add_parser("sft", help="LoRA supervised fine-tuning from a YAML config",
                       description="LoRA SFT of Qwen2.5-VL: model (HF directory or preset), LoRA, mesh, data, "
                                   "AdamW with warmup + cosine, gradient accumulation, orbax checkpoints (resumes "
                                   "from the latest one), periodic evaluation, export. SIGTERM saves and exits.")
    p.add_argument("--config", required=True, help="YAML config (see configs/sft.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.learning_rate=2e-4 (repeatable)")
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("demo", help="the whole pipeline on a tiny model in minutes: data, SFT, eval, export",
                       description="make-demo-data -> a tiny random Qwen2.5-VL saved in HF layout with the real "
                                   "Qwen2.5-VL tokenizer -> LoRA SFT -> greedy-decoding evaluation before and "
                                   "after -> export of the merged HF checkpoint and the PEFT adapter.")
    p.add_argument("--out", default="fxjax-demo", help="working directory (default: ./fxjax-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's tuned value)")
    p.add_argument("--n", type=int, default=None, help="demo images to generate (default: the demo's value)")
    p.add_argument("--quick", action="store_true", help="a much shorter run (smoke test; learns little)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"fxjax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
