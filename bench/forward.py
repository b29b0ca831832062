"""Forward throughput: fxjax (JAX/Flax NNX) vs transformers (torch) Qwen2.5-VL, fp32 on the CPU.

One command. The parent builds a random-weight HF model, save_pretrained's it to a temp dir and
writes one batch (a real photo per sample through fxjax.process_image, plus text). Then one child
process per framework loads that checkpoint (transformers from_pretrained / fxjax.from_pretrained:
the same weights), runs the batch, and times it; the parent checks that the logits agree and prints
the table. Children keep the two runtimes' thread pools (torch OpenMP, XLA Eigen) from competing
for the cores. Measurements:

  torch      model(**inputs, use_cache=False) under torch.inference_mode, sdpa attention
  fxjax jit  the jitted forward on prepared device inputs (model.prepare once), block_until_ready
  fxjax e2e  model(input_ids, ...) as a user calls it: host prep + transfer + jitted forward

and, with --breakdown, the vision encoder (+ merger) and the decoder + lm_head on their own.
tokens/s counts batch * sequence length, image tokens included.

    python bench/forward.py --breakdown      # mid-size (~154M) config, batch 4
    python bench/forward.py --small --iters 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
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
    # Qwen2.5-VL-3B-Instruct's shapes (its config.json), random weights; `scaled_config` cuts its depth.
    "3b": (
        dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
             num_attention_heads=16, num_key_value_heads=2, mrope_section=(16, 24, 24)),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
             fullatt_block_indexes=(7, 15, 23, 31)),
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


def scaled_config(name: str, text_layers: int | None, vision_depth: int | None) -> str:
    """CONFIGS[name] with fewer decoder layers / vision blocks (the full-attention blocks those of the model
    below the new depth, else the last), registered as a new name (the per-layer shapes, and so the kernels
    timed, stay the model's)."""
    if not text_layers and not vision_depth:
        return name
    text, vision = CONFIGS[name]
    text = {**text, "num_hidden_layers": text_layers or text["num_hidden_layers"]}
    depth = vision_depth or vision["depth"]
    full = tuple(i for i in vision["fullatt_block_indexes"] if i < depth) or (depth - 1,)
    vision = {**vision, "depth": depth, "fullatt_block_indexes": full}
    scaled = f"{name} ({text['num_hidden_layers']} decoder layers, {depth} vision blocks)"
    CONFIGS[scaled] = (text, vision)
    return scaled


def add_device_args(ap: argparse.ArgumentParser) -> None:
    """--device / --dtype / --config / --text-layers / --vision-depth: where both frameworks run and on what."""
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: both children on the GPU (torch .to('cuda'), JAX_PLATFORMS=cuda); the parent "
                    "stays on the CPU")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the weights' and compute dtype of both sides (LoRA stays float32, as peft's)")
    ap.add_argument("--config", choices=tuple(CONFIGS), default=None,
                    help="model shapes (default mid; --small = small; 3b: Qwen2.5-VL-3B's)")
    ap.add_argument("--text-layers", type=int, default=None, help="cut the config to this many decoder layers")
    ap.add_argument("--vision-depth", type=int, default=None, help="cut the config to this many vision blocks")


def config_name(args) -> str:
    """The CONFIGS name --config / --small / --text-layers / --vision-depth ask for (mid by default)."""
    return scaled_config(args.config or ("small" if args.small else "mid"), args.text_layers, args.vision_depth)


def save_checkpoint(hf, directory: Path, dtype: str) -> None:
    """save_pretrained in the children's --dtype (a bfloat16 run loads bfloat16 weights, as users' do)."""
    import torch

    hf.to(getattr(torch, dtype)).save_pretrained(str(directory))


def device_passthrough(args) -> list[str]:
    return ["--device", args.device, "--dtype", args.dtype]


def child_env(args) -> dict[str, str]:
    """The children's environment: JAX on the GPU with --device cuda (the parent keeps JAX on the CPU)."""
    return {**os.environ, "JAX_PLATFORMS": "cuda" if args.device == "cuda" else "cpu"}


def accelerator_line(args) -> str:
    """The machine line, plus the cores each child is pinned to, or the GPU's name with --device cuda."""
    line = machine_line()
    if args.device == "cpu":
        return line + f"; children pinned to {args.cores} cores"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    return line + f"; both children on the GPU: {out.stdout.strip() or out.stderr.strip()}"


def torch_setup(args):
    """(torch device, torch dtype) for a child; on the GPU, float32 means float32 (no TF32, torch's default)."""
    import torch

    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        torch.set_num_threads(args.cores)
    return torch.device(args.device), getattr(torch, args.dtype)


def jax_setup(args) -> None:
    """On the GPU, float32 matmuls at "highest" precision (XLA would use TF32), as torch's."""
    import jax

    if args.device == "cuda" and args.dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")


def peak_mb(framework: str, args) -> float:
    """This child's peak memory in MB: allocated GPU memory with --device cuda (torch's allocator, JAX's
    peak_bytes_in_use), else the process's peak resident set (model, optimiser, activations, runtime)."""
    if args.device == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if framework == "torch":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import jax

    return jax.local_devices()[0].memory_stats()["peak_bytes_in_use"] / 2**20


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


def time_calls(fns: dict, iters: int) -> dict[str, dict[str, list[float]]]:
    """Round-robin over fns (one call of each per round, so a burst of load from other processes
    hits every measurement alike); wall and process-CPU seconds per call."""
    out = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[name]["wall"].append(time.perf_counter() - t0)
            out[name]["cpu"].append(time.process_time() - c0)
    return out


def warm_then_time(fns: dict, warmup: int, iters: int) -> tuple[dict, list[float]]:
    """`time_calls` after 1 + warmup untimed calls of each fn; also the 1-min load average before and after."""
    for fn in fns.values():
        for _ in range(1 + warmup):
            fn()
    load = [os.getloadavg()[0]]
    times = time_calls(fns, iters)
    load.append(os.getloadavg()[0])
    return times, load


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / max(1.0, np.abs(ref).max()))


def worker_torch(workdir: Path, args) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(args.cores)
    t0 = time.perf_counter()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(workdir / "ckpt"), dtype=torch.float32, attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - t0
    data = dict(np.load(workdir / "batch.npz"))
    t_in = {k: torch.from_numpy(v) for k, v in data.items()}

    def forward():
        with torch.inference_mode():
            return hf(**t_in, use_cache=False).logits

    t0 = time.perf_counter()
    logits = forward().numpy()
    first_s = time.perf_counter() - t0
    np.save(workdir / "logits_torch.npy", logits)
    fns = {"forward": forward}
    if args.breakdown:
        grid, pv, ids = t_in["image_grid_thw"], t_in["pixel_values"], t_in["input_ids"]

        def vision():
            with torch.inference_mode():
                return hf.model.visual(pv, grid_thw=grid).pooler_output

        with torch.inference_mode():
            embeds = hf.model.get_input_embeddings()(ids)
            mask = (ids == hf.config.image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, vision())
            pos = hf.model.compute_3d_position_ids(
                input_ids=ids, image_grid_thw=grid, video_grid_thw=None, second_per_grid_ts=None,
                inputs_embeds=embeds, attention_mask=t_in["attention_mask"], cache=None,
                mm_token_type_ids=t_in["mm_token_type_ids"])

        def decoder():
            with torch.inference_mode():
                h = hf.model.language_model(inputs_embeds=embeds, position_ids=pos,
                                            attention_mask=t_in["attention_mask"], use_cache=False)
                return hf.lm_head(h.last_hidden_state)

        fns.update(vision=vision, decoder=decoder)
    times, load = warm_then_time(fns, args.warmup, args.iters)
    return dict(times=times, first_s=first_s, load_s=load_s, loadavg=load,
                version=f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def worker_fxjax(workdir: Path, args) -> dict:
    import jax
    from flax import nnx

    import fxjax
    from fxjax.model.qwen2_5_vl import _forward_logits

    t0 = time.perf_counter()
    model = fxjax.from_pretrained(workdir / "ckpt", dtype="float32")
    load_s = time.perf_counter() - t0
    data = dict(np.load(workdir / "batch.npz"))
    prep_args = (data["input_ids"], data["attention_mask"], data["pixel_values"], data["image_grid_thw"])
    t0 = time.perf_counter()
    inputs = model.prepare(*prep_args)
    prep_s = time.perf_counter() - t0
    dev = jax.device_put(inputs)

    def forward():
        return _forward_logits(model, dev).block_until_ready()

    def e2e():
        return model(*prep_args).block_until_ready()

    t0 = time.perf_counter()
    logits = np.asarray(forward())
    first_s = time.perf_counter() - t0
    np.save(workdir / "logits_fxjax.npy", logits)
    fns = {"forward": forward, "e2e": e2e}
    if args.breakdown:
        vision_fn = nnx.jit(lambda m, v: m.visual(v))
        decoder_fn = nnx.jit(lambda m, x, p, am: m.logits(m.decoder(x, p, am)[0]))
        x = nnx.jit(lambda m, i: m.embed(i))(model, dev).block_until_ready()

        def vision():
            return vision_fn(model, dev.vision).block_until_ready()

        def decoder():
            return decoder_fn(model, x, dev.position_ids, dev.attention_mask).block_until_ready()

        fns.update(vision=vision, decoder=decoder)
    times, load = warm_then_time(fns, args.warmup, args.iters)
    return dict(times=times, first_s=first_s, compile_s=first_s - min(times["forward"]["wall"]), load_s=load_s,
                prep_s=prep_s, loadavg=load, version=f"jax {jax.__version__} ({jax.devices()[0].platform})")


def _stats(ts: list[float]) -> tuple[float, float]:
    return statistics.median(ts), min(ts)


def cpu_model() -> str:
    """The CPU's "model name" from /proc/cpuinfo (platform.processor() elsewhere), with its family / model
    numbers and vector extensions: one vendor's "AMD EPYC" covers generations whose ratios differ (fxjax
    1.83x torch on a Zen 5 with AVX-512, 0.96x on a Zen 3 with AVX2 only, for the same forward)."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block is enough
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or "unknown CPU"
    name = fields.get("model name", platform.processor() or "unknown CPU")
    detail = []
    if "cpu family" in fields and "model" in fields:
        detail.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = set(fields.get("flags", "").split())
    if flags:
        detail += [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        if "avx512f" not in flags:
            detail.append("no AVX-512")
    return f"{name} ({', '.join(detail)})" if detail else name


def allocator() -> str:
    """The children's host allocator. On a CPU it moves fxjax's figures, not torch's: XLA:CPU allocates a
    step's temporary buffers afresh at every execution and glibc gives each one over 32 MB back to the
    kernel, so every step zeroes those pages again (~11% of an SFT step). The fxjax child does what the
    `fxjax` command does (`fxjax.host_allocator.keep_freed_memory`, in `run_worker`) unless
    FXJAX_SYSTEM_MALLOC=1, a malloc setting of the user's or another allocator says otherwise: this line
    reads them with the same functions."""
    from fxjax.host_allocator import OPT_OUT, opted_out, preloaded_allocator  # (the children inherit it all)

    tuned = [f"{k}={os.environ[k]}" for k in sorted(os.environ)
             if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", OPT_OUT)]
    other = preloaded_allocator(os.environ)
    if other is not None:
        out = f"{other} preloaded ({os.environ.get('LD_PRELOAD', '')})"
    elif opted_out(os.environ):
        out = "glibc malloc as it is"
    else:
        out = "glibc malloc; on a CPU the fxjax child keeps freed memory as `fxjax` does"
    return out + (f" ({', '.join(tuned)})" if tuned else "")


def machine_line() -> str:
    return (f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {' / '.join(f'{x:.2f}' for x in os.getloadavg())}"
            f"; allocator: {allocator()}")


def add_worker_args(ap: argparse.ArgumentParser, cores_help: str = "pin each child to this many cores; torch "
                    "threads = cores") -> None:
    """--cores, and the hidden --worker / --workdir a benchmark's child processes are started with."""
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help=cores_help)
    ap.add_argument("--worker", choices=("torch", "fxjax"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)


def run_child(script: str | Path, worker: str, workdir: Path, passthrough: list[str],
              env: dict[str, str] | None = None) -> dict:
    """Run `script --worker <worker>` in its own process (frameworks never share the cores) and return the
    result it wrote (`run_worker`)."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", worker, "--workdir", str(workdir)]
    subprocess.run(cmd + passthrough, check=True, env=env)
    return json.loads((workdir / f"result_{worker}.json").read_text())


def run_children(script: str | Path, workdir: Path, passthrough: list[str], env: dict[str, str] | None = None,
                 workers: tuple[str, ...] = ("torch", "fxjax")) -> dict:
    """`run_child` for each worker in turn; each one's result is printed as soon as it is in (a lease's figures
    are not lost to the other side's failure, nor to a time limit that kills this process before its table)."""
    results = {}
    for worker in workers:
        results[worker] = run_child(script, worker, workdir, passthrough, env)
        print(f"{worker} child's result: {json.dumps(results[worker])}", flush=True)
    return results


def run_worker(args, workers) -> int:
    """Child-process side of a benchmark: pin to args.cores cores, run workers[args.worker], write its result."""
    if args.cores < os.cpu_count():
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
    workdir = Path(args.workdir)
    if args.worker == "fxjax":  # as the `fxjax` command, before JAX starts (a CPU run: malloc keeps freed memory)
        from fxjax.host_allocator import keep_freed_memory

        keep_freed_memory()
    result = workers[args.worker](workdir, args)
    (workdir / f"result_{args.worker}.json").write_text(json.dumps(result))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per measurement (median and min reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) one")
    ap.add_argument("--small", action="store_true", help="tiny config for a quick smoke run")
    ap.add_argument("--image-side", type=int, default=448)
    ap.add_argument("--text-tokens", type=int, default=64, help="non-image tokens per sample (incl. 2 vision markers)")
    ap.add_argument("--breakdown", action="store_true", help="also time vision and decoder + lm_head separately")
    add_worker_args(ap, "pin each child to this many cores (XLA sizes its pool to them); torch threads = cores")
    args = ap.parse_args(argv)

    if args.worker:
        return run_worker(args, {"torch": worker_torch, "fxjax": worker_fxjax})

    name = "small" if args.small else "mid"
    tmp = tempfile.TemporaryDirectory(prefix="fxjax_bench_")
    workdir = Path(tmp.name)
    t0 = time.perf_counter()
    hf = build_hf_model(name)
    n_params = sum(p.numel() for p in hf.parameters())
    n_vision = sum(p.numel() for p in hf.model.visual.parameters())
    hf.save_pretrained(str(workdir / "ckpt"))
    del hf
    data = make_batch(args.batch, args.text_tokens, args.image_side, CONFIGS[name][0]["vocab_size"])
    np.savez(workdir / "batch.npz", **data)
    build_s = time.perf_counter() - t0
    b, length = data["input_ids"].shape
    tokens = b * length
    n_image = int(data["mm_token_type_ids"].sum()) // b

    print(f"config {name}: {n_params / 1e6:.1f}M params (vision {n_vision / 1e6:.1f}M, "
          f"text + lm_head {(n_params - n_vision) / 1e6:.1f}M), fp32, untied lm_head")
    print(f"  text   {CONFIGS[name][0]}\n  vision {CONFIGS[name][1]}")
    print(f"batch {b} x {length} tokens = {tokens} tokens/forward ({n_image} image + {length - n_image} text per "
          f"sample); {data['pixel_values'].shape[0]} patches, grid {data['image_grid_thw'][0].tolist()} per image")
    print(f"build + save_pretrained + batch: {build_s:.1f}s; children pinned to {args.cores} cores")
    print(machine_line())  # the CPU model with every figure: ratios differ between CPU generations

    results = {}
    passthrough = ["--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
                   "--cores", str(args.cores)] + (["--breakdown"] if args.breakdown else [])
    for worker in ("torch", "fxjax"):
        results[worker] = run_child(__file__, worker, workdir, passthrough)
    ref = np.load(workdir / "logits_torch.npy")
    out = np.load(workdir / "logits_fxjax.npy")
    tmp.cleanup()

    tr, fx = results["torch"], results["fxjax"]
    print(f"{tr['version']}; {fx['version']}")
    print()
    print(f"logits {out.shape}: rel err fxjax vs torch {rel_err(out, ref):.2e} (max|diff| / max(1, max|ref|)), "
          f"argmax agreement {(out.argmax(-1) == ref.argmax(-1)).mean() * 100:.1f}%")
    print(f"load: torch from_pretrained {tr['load_s']:.1f}s, fxjax.from_pretrained {fx['load_s']:.1f}s")
    print(f"first call: torch {tr['first_s']:.2f}s; fxjax {fx['first_s']:.2f}s, of which trace + compile "
          f"~{fx['compile_s']:.2f}s (excluded from timings); model.prepare (host) {fx['prep_s'] * 1e3:.1f} ms")
    busy = max(tr["loadavg"] + fx["loadavg"])
    print(f"1-min load average around timing: torch {tr['loadavg'][0]:.2f}/{tr['loadavg'][1]:.2f}, fxjax "
          f"{fx['loadavg'][0]:.2f}/{fx['loadavg'][1]:.2f} on {os.cpu_count()} cores"
          + ("  << other processes competed for the CPU: trust 'min' more" if busy > os.cpu_count() + 0.5 else ""))
    print()
    rows = [("torch (sdpa, inference_mode)", tr, "forward", None),
            ("fxjax jitted forward", fx, "forward", "forward"),
            ("fxjax model(...) end to end", fx, "e2e", "forward")]
    if args.breakdown:
        rows += [("torch vision encoder + merger", tr, "vision", None),
                 ("fxjax vision encoder + merger", fx, "vision", "vision"),
                 ("torch decoder + lm_head", tr, "decoder", None),
                 ("fxjax decoder + lm_head", fx, "decoder", "decoder")]
    header = (f"{'measurement':31s} {'median s':>9s} {'min s':>7s} {'cpu s':>6s} {'tok/s med':>10s} "
              f"{'tok/s min':>10s} {'speedup vs torch (med/min)':>27s}")
    print(header)
    print("-" * len(header))
    for label, res, key, ref_key in rows:
        med, best = _stats(res["times"][key]["wall"])
        cpu = statistics.median(res["times"][key]["cpu"])
        tps = f"{tokens / med:10.1f} {tokens / best:10.1f}" if key in ("forward", "e2e") else " " * 21
        ratio = ""
        if ref_key:
            rmed, rbest = _stats(tr["times"][ref_key]["wall"])
            ratio = f"{rmed / med:.2f}x / {rbest / best:.2f}x"
        print(f"{label:31s} {med:9.3f} {best:7.3f} {cpu:6.2f} {tps} {ratio:>27s}")
    print()
    tmed, tbest = _stats(tr["times"]["forward"]["wall"])
    jmed, jbest = _stats(fx["times"]["forward"]["wall"])
    emed, ebest = _stats(fx["times"]["e2e"]["wall"])
    print(f"throughput ratio fxjax/torch (>= 1.0: fxjax faster): jitted {tmed / jmed:.2f} (min-based "
          f"{tbest / jbest:.2f}), end to end {tmed / emed:.2f} (min-based {tbest / ebest:.2f})")
    tcpu = statistics.median(tr["times"]["forward"]["cpu"])
    jcpu = statistics.median(fx["times"]["forward"]["cpu"])
    print(f"process CPU seconds per forward (less sensitive to other load): torch {tcpu:.2f}, fxjax {jcpu:.2f} "
          f"(ratio {tcpu / jcpu:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
