"""How far the demo's GRPO policy moves in each stage, measured on a finished `fxjax demo` output folder.

    python bench/demo_policy.py fxjax-demo                 # 16 samples per held-out image (~10 min on 2 cores)
    python bench/demo_policy.py fxjax-demo --samples 4

Greedy decoding (what `fxjax eval` and the demo's table use) shows a policy only through its argmax, and a
training step's mean reward (32 samples of 8 prompts) mostly shows which samples were drawn. This script
measures the policy itself, after SFT and after each GRPO stage:

1. The held-out reward in expectation: --samples completions per held-out image with the run's own sampling
   settings (grpo.yaml: temperature, top-k), drawn with the same random numbers at every checkpoint (common
   random numbers), so that the change between two checkpoints is the policy's and not the draw's. Per
   stage, under its own reward weights: start (the checkpoint before it) -> end, the change paired per image,
   mean +/- its standard error over the images.
2. The first digit of the box's y1, teacher-forced along each greedy answer: the demo's region is the top or
   the bottom band, so y1 starts with "0" or "2". For the top-band and the bottom-band images, the mean of
   log p("0") / p("2"): their difference is what the model reads from the image, their mean the offset it
   applies to every image; and the share of the probability the two digits hold.
3. The sampled boxes' mean IoU on the top-band and the bottom-band generated images and the mean of the two
   (what a held-out set with as many images of each band would show): a policy that barely tells the bands
   apart can trade one band's right rows for the other's, which a split with more of one band shows as a
   gain or a loss.

docs/demo_tuning.md ("How far the policy moves in each stage") has its output for seeds 0 and 4.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from fxjax import rewards
from fxjax.commands.eval_folder import prompt_data_config
from fxjax.commands.eval import step_detector
from fxjax.data.pipeline import DataPipeline
from fxjax.data.records import load_records
from fxjax.data.tokenizer import token_id
from fxjax.demo import STAGES, _eval_args, _model_flags
from fxjax.model.generate import decode_step, generate_device, next_positions, prefill, sample_groups
from fxjax.train.inference import GreedyDecoder

sys.path.insert(0, str(Path(__file__).parent))
from forward import cpu_model  # noqa: E402  (bench/forward.py: the CPU's model name; imports no jax)

BATCH = 10
SEED = 1234  # the common random numbers: the same key for every checkpoint


def checkpoints(demo: Path) -> list[tuple[str, list[str]]]:
    """(name, `fxjax eval`'s model options) after SFT and at the end of each GRPO stage (the stages of grpo.yaml; the run
    keeps each stage's end, `--step NAME`)."""
    config = yaml.safe_load((demo / "grpo.yaml").read_text(encoding="utf-8"))
    out = [("after SFT", _model_flags(model=demo / "base-model", adapter=demo / "sft-adapter"))]
    for stage in config["stages"]:
        out.append((f"after {stage['name']}",
                    _model_flags(model=demo / "base-model", run=demo / "grpo", step=stage["name"])))
    return out


class Policy:
    """One checkpoint's model, tokenizer and prompt batches of the held-out records."""

    def __init__(self, model_flags: list[str], test_file: Path, records, max_new_tokens: int):
        args = _eval_args(model_flags, test_file, Path("unused"),
                          dict(examples=len(records), batch_size=BATCH, max_new_tokens=max_new_tokens))
        detector = step_detector(args, args.step[0] if args.step else None)
        detector.load()
        self.model = detector.model
        self.decoder = GreedyDecoder(self.model, detector.tokenizer, batch_size=BATCH, max_new_tokens=max_new_tokens)
        self.tokenizer = self.decoder.tokenizer
        self.max_new_tokens = max_new_tokens
        self.config = dataclasses.replace(prompt_data_config(args, detector.data, detector.tokenizer), batch_size=BATCH)
        self.records = records

    def batches(self):
        """(batch index, real rows, model inputs prepared as the greedy decoder prepares them)."""
        for index, batch in enumerate(DataPipeline(self.config, records=self.records)):
            yield index, len(batch["meta"]), self.decoder.inputs(batch)

    def samples(self, n: int, temperature: float, top_k: int) -> list[list[str]]:
        """n sampled completions per record, from the same random numbers whatever the checkpoint."""
        out = []
        for index, real, inputs in self.batches():
            rng = jax.random.fold_in(jax.random.key(SEED), index)
            tokens = np.asarray(sample_groups(self.model, inputs, num_generations=n, max_new_tokens=self.max_new_tokens,
                                              temperature=temperature, top_k=top_k or None, rng=rng,
                                              eos_token_ids=(self.decoder.im_end,),
                                              pad_token_id=self.decoder.pad_id).tokens)
            out += [[self.decoder.text(tokens[r * n + g].tolist()) for g in range(n)] for r in range(real)]
        return out

    def row_digit(self) -> list[tuple[float, float] | None]:
        """Per record, (p("0"), p("2")) at the first digit of y1, teacher-forced along the greedy answer; None
        where the greedy answer has no box."""
        box_start = token_id(self.tokenizer, "<|box_start|>")
        digit = {d: token_id(self.tokenizer, d) for d in ("0", "2")}
        out = []
        for _, real, inputs in self.batches():
            greedy = np.asarray(generate_device(self.model, inputs, max_new_tokens=self.max_new_tokens,
                                                eos_token_ids=(self.decoder.im_end,),
                                                pad_token_id=self.decoder.pad_id).tokens)
            where = {r: self._y1_position(greedy[r].tolist(), box_start) for r in range(real)}
            logits, cache = prefill(self.model, inputs, inputs.input_ids.shape[1] + self.max_new_tokens)
            positions = jnp.asarray(next_positions(inputs))
            found = {}
            last = max([k for k in where.values() if k is not None], default=-1)
            for step in range(last + 1):
                for r, k in where.items():
                    if k == step:
                        p = np.asarray(jax.nn.softmax(logits[r].astype(jnp.float32)))
                        found[r] = (float(p[digit["0"]]), float(p[digit["2"]]))
                logits, cache = decode_step(self.model, jnp.asarray(greedy[:, step]), positions + step, cache)
            out += [found.get(r) for r in range(real)]
        return out

    def _y1_position(self, ids: list[int], box_start: int) -> int | None:
        """Index of y1's first digit: after <|box_start|>, "[", x1's digits, "," and " "."""
        if box_start not in ids:
            return None
        k = ids.index(box_start) + 2  # past "["
        while k < len(ids) and self.tokenizer.decode([ids[k]]).isdigit():
            k += 1
        return k + 2 if k + 2 < len(ids) else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="a finished `fxjax demo` output folder (--out)")
    parser.add_argument("--samples", type=int, default=16, help="sampled completions per held-out image")
    parser.add_argument("--examples", type=int, default=60, help="held-out images (the demo evaluates 60)")
    args = parser.parse_args(argv)
    demo = args.demo.resolve()
    grpo = yaml.safe_load((demo / "grpo.yaml").read_text(encoding="utf-8"))["grpo"]
    test_file = demo / "data" / "test.jsonl"
    records, _ = load_records([str(test_file)], None, "auto", "raise")
    records = records[:args.examples]
    targets = [{"label": r.label, "boxes": [list(region.bbox) for region in r.regions]} for r in records]
    print(f"{demo}: {len(records)} held-out images, {args.samples} samples each at temperature "
          f"{grpo['temperature']}, top-k {grpo['top_k']}; {cpu_model()}, "
          f"{jax.device_count()} {jax.default_backend()} device(s)", flush=True)
    expected, digits, ious, names = {}, {}, {}, []
    for name, source in checkpoints(demo):
        policy = Policy(source, test_file, records, grpo["max_completion_length"])
        texts = policy.samples(args.samples, grpo["temperature"], grpo["top_k"])
        flat = [t for per_record in texts for t in per_record]
        repeated = [t for t in targets for _ in range(args.samples)]
        scored = {stage: rewards.score(flat, repeated, stage=stage) for stage in STAGES}
        expected[name] = {stage: np.asarray(scored[stage]["total"]).reshape(len(records), -1) for stage in STAGES}
        ious[name] = np.asarray(scored[STAGES[0]]["iou"]).reshape(len(records), -1).mean(axis=1)
        digits[name] = policy.row_digit()
        names.append(name)
        print(f"  {name}: mean reward " + ", ".join(f"{s} {expected[name][s].mean():+.3f}" for s in STAGES),
              flush=True)
    print("\nheld-out reward in expectation, each stage under its own weights (change paired per image):")
    for start, end, stage in zip(names, names[1:], STAGES):
        change = (expected[end][stage] - expected[start][stage]).mean(axis=1)
        print(f"  {stage}: {expected[start][stage].mean():+.3f} -> {expected[end][stage].mean():+.3f}, change "
              f"{change.mean():+.3f} +/- {change.std(ddof=1) / np.sqrt(change.size):.3f}")
    print('\nfirst digit of y1, teacher-forced: mean log p("0")/p("2"), top- / bottom-band images '
          "(difference; offset), the two digits' share of the probability:")
    for name in names:
        gaps, share = {"top": [], "bottom": []}, []
        for record, found in zip(records, digits[name]):
            if record.label != "generated" or found is None or not record.regions:
                continue
            p0, p2 = found
            gaps["top" if record.regions[0].bbox[1] == 0 else "bottom"].append(np.log(p0 / p2))
            share.append(p0 + p2)
        if not gaps["top"] or not gaps["bottom"]:
            print(f"  {name}: too few boxed answers in one band")
            continue
        top, bottom = np.mean(gaps["top"]), np.mean(gaps["bottom"])
        print(f"  {name}: {top:+.2f} / {bottom:+.2f} ({top - bottom:.2f}; {(top + bottom) / 2:+.2f}), "
              f"share {np.mean(share):.2f}")
    print("\nsampled boxes' mean IoU, top- / bottom-band generated images (their mean):")
    bands = {band: [i for i, r in enumerate(records) if r.label == "generated" and r.regions
                    and (r.regions[0].bbox[1] == 0) == (band == "top")] for band in ("top", "bottom")}
    for name in names:
        if not bands["top"] or not bands["bottom"]:
            print(f"  {name}: no generated image of one band")
            continue
        top, bottom = (float(ious[name][bands[band]].mean()) for band in ("top", "bottom"))
        print(f"  {name}: {top:.3f} / {bottom:.3f} ({(top + bottom) / 2:.3f}); images {len(bands['top'])} / "
              f"{len(bands['bottom'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
