"""Peak host memory of fxjax.from_pretrained.

Claim under test: loading streams one tensor at a time, so the extra host memory a load needs stays
near model + largest tensor, not twice the checkpoint.

One command. A child process builds a random-weight HF Qwen2.5-VL (~318M parameters, 1.27 GB in
fp32) with transformers and saves it three ways (its memory never counts):

  fp32_single    one model.safetensors (fp32)
  fp32_sharded   max_shard_size=200MB shards + index (fp32)
  bf16_single    one model.safetensors in bf16, loaded into an fp32 model (dtype="float32")
  bf16_stored    the same bf16 file loaded as stored (param_dtype from hf_checkpoint.exact_param_dtype:
                 bfloat16), as `fxjax export` loads a run's base since it merges in float32 per tensor;
                 the table's last line is its peak extra over bf16_single's, in the same invocation

Then, per checkpoint, a fresh child imports fxjax/jax, initialises the CPU backend, takes its RSS
as the baseline, resets the kernel's peak-RSS mark (/proc/self/clear_refs 5), runs
fxjax.from_pretrained, and reads the peak: VmHWM (per-process high-water mark; with the reset it
covers the load only), ru_maxrss (getrusage; not reset, so also bounds import-time peaks) and a
2 ms psutil-style sampler of /proc/self/status that splits RSS into anonymous memory (heap, the
model's buffers) and file-backed pages (mmapped safetensors). Peak extra = peak - baseline.

    python bench/load_memory.py            # ~1.3 GB checkpoints, ~2 min on 2 cores
    python bench/load_memory.py --small    # 40 MB checkpoints, smoke run
    python bench/load_memory.py --scan-layers   # load into stacked layers (scan_layers): each layer's
                                                # tensor is written into its slice on the device in place
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward import cpu_model  # noqa: E402  (bench/forward.py: the CPU's model name; imports no jax)

# Text ~296M (untied 48k vocab: embed + lm_head 2 x 49M), vision ~22M. Largest tensor: 48000 x 1024
# fp32 = 196.6 MB, under the 200MB shard size so sharding splits as HF would for a real model.
CONFIGS = {
    "large": dict(
        text=dict(vocab_size=48000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=18,
                  num_attention_heads=16, num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=512, intermediate_size=1368, num_heads=8, fullatt_block_indexes=[1, 3]),
        shard="200MB",
    ),
    "small": dict(
        text=dict(vocab_size=8000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, fullatt_block_indexes=[1]),
        shard="5MB",
    ),
}
BUILT = ("fp32_single", "fp32_sharded", "bf16_single")
VARIANTS = BUILT + ("bf16_stored",)
STORED_FROM = {"bf16_stored": "bf16_single"}  # variant -> the checkpoint it loads, as stored


def build(workdir: Path, name: str) -> None:
    """Child: build the HF model once, save the three checkpoints."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = CONFIGS[name]
    text = dict(spec["text"])
    section = text.pop("mrope_section")
    cfg = Qwen2_5_VLConfig(
        text_config=dict(**text, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
                         tie_word_embeddings=False),
        vision_config=dict(**spec["vision"], out_hidden_size=text["hidden_size"], window_size=112),
        tie_word_embeddings=False,
        image_token_id=text["vocab_size"] - 10, video_token_id=text["vocab_size"] - 9,
        vision_start_token_id=text["vocab_size"] - 8, vision_end_token_id=text["vocab_size"] - 7,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(workdir / "fp32_single"), max_shard_size="100GB")
    model.save_pretrained(str(workdir / "fp32_sharded"), max_shard_size=spec["shard"])
    model.to(torch.bfloat16).save_pretrained(str(workdir / "bf16_single"), max_shard_size="100GB")


def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(self.interval)


def checkpoint_facts(directory: Path, target_itemsize: int) -> dict:
    """Sizes from the safetensors headers only (nothing loaded)."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    largest, largest_name, count = 0, "", 0
    itemsize = {"F32": 4, "BF16": 2, "F16": 2}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                n = 1
                for d in sl.get_shape():
                    n *= d
                count += 1
                if n * itemsize[sl.get_dtype()] > largest:
                    largest, largest_name = n * itemsize[sl.get_dtype()], key
                    largest_elems = n
    return dict(files=len(files), tensors=count, checkpoint_bytes=sum(f.stat().st_size for f in files),
                largest_tensor=largest_name, largest_disk_bytes=largest,
                largest_model_bytes=largest_elems * target_itemsize)


def measure(directory: Path, scan_layers: bool = False, as_stored: bool = False) -> dict:
    """Child: baseline after imports and backend init, then from_pretrained (float32 weights, or with
    `as_stored` the smaller dtype that holds the checkpoint's exactly); peak RSS."""
    import gc

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import fxjax
    from fxjax.hf_checkpoint import exact_param_dtype

    param_dtype = exact_param_dtype(directory) if as_stored else "float32"
    jnp.zeros((8,)).block_until_ready()  # CPU client and its thread pools exist before the baseline
    gc.collect()
    ru_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = _status()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    model = fxjax.from_pretrained(directory, dtype="float32", param_dtype=param_dtype, scan_layers=scan_layers)
    load_s = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    after = _status()
    ru_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    param_bytes = sum(x.nbytes for x in leaves)
    facts = checkpoint_facts(directory, target_itemsize=jnp.dtype(param_dtype).itemsize)
    return dict(
        **facts, param_dtype=param_dtype, load_s=load_s, param_bytes=param_bytes, params=sum(x.size for x in leaves),
        baseline_rss=base["VmRSS"], baseline_anon=base["RssAnon"], baseline_file=base["RssFile"],
        hwm=after["VmHWM"], ru_maxrss_before=ru_before, ru_maxrss=ru_after,
        sampled_rss=sampler.peak["VmRSS"], sampled_anon=sampler.peak["RssAnon"],
        sampled_file=sampler.peak["RssFile"],
        after_rss=after["VmRSS"], after_anon=after["RssAnon"], after_file=after["RssFile"],
    )


def mb(n: float) -> str:
    return f"{n / 1e6:8.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="40 MB checkpoints for a smoke run")
    ap.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir, removed after)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--json", help="also write the raw results here")
    ap.add_argument("--scan-layers", action="store_true", help="load into stacked layers under scan")
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--as-stored", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    name = "small" if args.small else "large"

    if args.build:
        build(Path(args.build), name)
        return 0
    if args.measure:
        print("RESULT " + json.dumps(measure(Path(args.measure), args.scan_layers, args.as_stored)))
        return 0

    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="fxjax_loadmem_")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    me = str(Path(__file__).resolve())
    if not all((workdir / v / "config.json").exists() for v in BUILT):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, me, "--build", str(workdir)] + (["--small"] if args.small else []),
                       check=True, env=env, stdout=subprocess.DEVNULL)
        print(f"built checkpoints in {time.perf_counter() - t0:.0f}s under {workdir}")

    results = {}
    for variant in args.variants:
        proc = subprocess.run([sys.executable, me, "--measure", str(workdir / STORED_FROM.get(variant, variant))]
                              + (["--scan-layers"] if args.scan_layers else [])
                              + (["--as-stored"] if variant in STORED_FROM else []),
                              check=True, env=env, capture_output=True, text=True)
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        results[variant] = json.loads(line[len("RESULT "):])
    if tmp:
        tmp.cleanup()

    first = next(iter(results.values()))
    print(f"CPU: {cpu_model()}")
    print(f"model: {first['params'] / 1e6:.1f}M params, {first['param_dtype']} in memory = "
          f"{first['param_bytes'] / 1e6:.1f} MB; "
          f"largest tensor {first['largest_tensor']}")
    print("all sizes in MB (1e6 bytes); 'extra' = peak - RSS after imports and backend init\n")
    cols = ("checkpoint", "files", "ckpt", "model", "largest", "base RSS", "peak extra", "ratio",
            "anon extra", "file extra", "kept", "load s")
    print(f"{cols[0]:13s} {cols[1]:>5s} " + " ".join(f"{c:>10s}" for c in cols[2:]))
    for variant, r in results.items():
        peak = max(r["hwm"], r["sampled_rss"])
        extra = peak - r["baseline_rss"]
        bound = r["param_bytes"] + r["largest_model_bytes"]
        row = [mb(r["checkpoint_bytes"]), mb(r["param_bytes"]), mb(r["largest_model_bytes"]), mb(r["baseline_rss"]),
               mb(extra), f"{extra / bound:8.2f}", mb(r["sampled_anon"] - r["baseline_anon"]),
               mb(r["sampled_file"] - r["baseline_file"]), mb(r["after_rss"] - r["baseline_rss"]),
               f"{r['load_s']:8.1f}"]
        print(f"{variant:13s} {r['files']:5d} " + " ".join(f"{c:>10s}" for c in row))
    print("\nratio = peak extra / (model + largest tensor, in the dtype loaded): ~1.0 means the claim holds; 2x "
          "checkpoint would be ~2.0 for fp32.")
    if {"bf16_single", "bf16_stored"} <= set(results):
        extra = {v: max(results[v]["hwm"], results[v]["sampled_rss"]) - results[v]["baseline_rss"]
                 for v in ("bf16_single", "bf16_stored")}
        print(f"bf16 checkpoint loaded as stored (export) / into float32: peak extra {mb(extra['bf16_stored'])} / "
              f"{mb(extra['bf16_single'])} MB = {extra['bf16_stored'] / extra['bf16_single']:.2f}")
    print("anon/file extra: sampled (2 ms) peaks of RssAnon / RssFile (mmapped safetensors pages); "
          "kept: RSS - baseline after the load returned.")
    print("ru_maxrss (not reset; includes imports): " + ", ".join(
        f"{v} {r['ru_maxrss'] / 1e6:.1f} MB" for v, r in results.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
