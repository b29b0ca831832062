"""Evaluation on the held-out split: loss, and generation-based metrics through the rewards parser.

* loss: mean token cross-entropy over the assistant spans (the training loss, without dropout);
* generation: greedy decoding with the KV cache (`model.generate.generate_device`) from the prompt alone,
  the completion decoded up to its stop token (<|im_end|> or an eos of the model's generation_config.json,
  `fxjax.hf_checkpoint.stop_token_ids`), then `rewards.score` against the record's label and boxes:
  ``format_rate`` (the authors' format check), ``verdict_accuracy`` (the first verdict equals the truth)
  and ``mean_iou`` (matched IoU, averaged over the held-out images that have boxes).

Every process reads every held-out record and builds the same batches; each batch splits over the mesh's
data x fsdp devices (one that cannot split is refused when the run starts), so the numbers agree.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from flax import nnx

from fxjax import detection_metrics
from fxjax.data.pipeline import DataConfig, DataPipeline
from fxjax.model.lora import BASE_PARAMS, LORA_PARAMS
from fxjax.device_mesh import batch_shards, splits_batch, use_mesh
from fxjax.train.batching import (batch_shardings, build_step_batch, check_same_records, grow_floor, pad_rows,
                                  place_batch, process_image_share)
from fxjax.train.inference import GreedyDecoder
from fxjax.train.step import make_eval_loss

__all__ = ["EvalResult", "Evaluator"]


@dataclass
class EvalResult:
    loss: float | None = None
    format_rate: float | None = None
    verdict_accuracy: float | None = None
    mean_iou: float | None = None
    examples: int = 0
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few (label, record_id, completion)
    dropped: dict[str, int] = field(default_factory=dict)  # held-out examples the loss pass left out, by kind

    def metrics(self) -> dict[str, Any]:
        """The eval record: the numbers (`dropped_<kind>` for each kind of example left out), and the sample
        completions when there are any (metrics.jsonl keeps them, TensorBoard only the numbers), so a run's
        record shows what the model actually writes."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None and v != [] and k != "dropped"}
        return out | {f"dropped_{kind}": n for kind, n in sorted(self.dropped.items())}


class Evaluator:
    """Held-out evaluation of a Qwen25VL with LoRA adapters.

    data_cfg: the training DataConfig (pixels, lengths, prompts); eval_files replace its data_files.
    """

    def __init__(self, data_cfg: DataConfig, eval_files, *, batch_size: int, max_examples: int | None,
                 max_new_tokens: int, loss_chunk: int, mesh=None, gather_for_decoding: str = "auto",
                 say: Callable[[str], None] | None = None):
        base = dataclasses.replace(data_cfg, data_files=tuple(eval_files), batch_size=batch_size, shuffle=False,
                                   num_epochs=1, drop_remainder=False, shard_index=0, shard_count=1,
                                   worker_count=0)
        share = process_image_share()  # (every process builds them; what they warn of, the first one says)
        first = DataPipeline(base, image_share=share)
        records = first.records[:max_examples] if max_examples else first.records
        self.loss_pipeline = DataPipeline(base, records=records, report=first.report, image_share=share)
        # every process reads the eval files itself: different records (a per-host copy that differs, an image
        # one host skipped) would log a mix of two evaluations, or hang the process with more batches
        check_same_records(self.loss_pipeline)
        self.prompt_pipeline = DataPipeline(dataclasses.replace(base, mode="prompt"), records=records,
                                            report=first.report, image_share=share)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.loss_chunk = loss_chunk
        self.mesh = mesh
        self.pad_id = self.loss_pipeline.pad_id
        # eval.batch_size against the mesh: checked with the run's other batch checks (batch_divides)
        self._decoder = GreedyDecoder(None, data_cfg.tokenizer, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens, mesh=mesh, allow_replicated=True,
                                      gather_for_decoding=gather_for_decoding, say=say)
        self._eval_loss = None
        self._graphdef = None
        self._floor: dict[str, int] = {}
        self.dropped: dict[str, int] = {}  # of the last loss pass
        self.loss_examples = 0

    def __len__(self) -> int:
        return len(self.loss_pipeline.records)

    # ---- loss ------------------------------------------------------------------------------------

    def loss(self, model, params, base, rest) -> float | None:
        """Mean token NLL over the held-out assistant spans (model supplies the graph; params its LoRA state);
        None when no example is left to take it over (every one too long, say: `dropped` counts them)."""
        total, count = 0.0, 0.0
        batches = iter(self.loss_pipeline)
        self.dropped, self.loss_examples = {}, 0
        for batch in batches:
            if self._eval_loss is None:
                self._eval_loss = self._make_eval_loss(model)
            self.loss_examples += len(batch["meta"])
            batch = pad_rows(batch, self.batch_size)
            split = self.mesh is not None and splits_batch(self.mesh, self.batch_size)
            shards = batch_shards(self.mesh) if split else 1
            step_batch = build_step_batch([batch], model.config, self.pad_id, floor=self._floor,
                                          batch_shards=shards)
            self._floor = grow_floor(self._floor, step_batch, model.config, shards)
            if self.mesh is not None:
                step_batch = place_batch(step_batch, batch_shardings(step_batch, self.mesh, split))
            with use_mesh(self.mesh):  # traced under the mesh: activations' batch pinned, Splash per shard
                t, c = self._eval_loss(params, base, rest, step_batch)
            total += float(t)
            count += float(c)
        self.dropped = dict(batches.dropped)
        return total / count if count else None

    def _make_eval_loss(self, model):
        was_training = _training(model)
        model.eval()
        self._graphdef = nnx.split(model, LORA_PARAMS, BASE_PARAMS, ...)[0]
        if was_training:
            model.train()
        return make_eval_loss(self._graphdef, loss_chunk=self.loss_chunk)

    # ---- generation ------------------------------------------------------------------------------

    def completions(self, model) -> tuple[list[str], list[dict]]:
        """Greedy completions of every held-out prompt, with the records' meta (train.inference.GreedyDecoder)."""
        texts, metas = [], []
        was_training = _training(model)
        self._decoder.model = model
        try:
            for batch_texts, batch_metas in self._decoder.batches(self.prompt_pipeline):
                texts += batch_texts
                metas += batch_metas
        finally:
            if was_training:
                model.train()
        return texts, metas

    def generation_metrics(self, model, n_samples: int = 2) -> EvalResult:
        """The held-out greedy completions scored as `fxjax eval` scores them (fxjax.detection_metrics: one
        owner of the format rate, verdict accuracy and mean IoU on generated images), and a few of them."""
        texts, metas = self.completions(model)
        rows = detection_metrics.score_completions(texts, [{"label": m["label"], "boxes": m["boxes"]} for m in metas])
        summary = detection_metrics.summarize(rows) if rows else {}
        samples = []
        for label in ("generated", "real"):
            for text, meta in zip(texts, metas):
                if meta["label"] == label and sum(s["label"] == label for s in samples) < max(1, n_samples // 2):
                    samples.append({"label": label, "record_id": meta["record_id"], "completion": text})
        return EvalResult(format_rate=summary.get("format_rate"), verdict_accuracy=summary.get("accuracy"),
                          mean_iou=summary.get("mean_iou"), examples=len(texts), samples=samples)

    def evaluate(self, model, params, base, rest, *, generate: bool = True) -> EvalResult:
        start = time.perf_counter()
        result = self.generation_metrics(model) if generate else EvalResult()
        result.loss = self.loss(model, params, base, rest)
        result.dropped = self.dropped
        if not generate:
            result.examples = self.loss_examples
        result.seconds = time.perf_counter() - start
        return result


def _training(model) -> bool:
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Dropout):
            return not module.deterministic
    return False
