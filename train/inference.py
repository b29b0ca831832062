"""Greedy completions of prompt batches, one batch at a time (for `fxjax eval` and `fxjax detect`).

    decoder = GreedyDecoder(model, tokenizer_dir, batch_size=8, max_new_tokens=1024, mesh=mesh)
    for texts, metas in decoder.batches(DataPipeline(prompt_config, records=records)):
        ...   # written out as they come: an interrupted evaluation keeps what it finished

The held-out evaluation during training (train.evaluation.Evaluator.completions) decodes with it too:
the pipeline's left-padded prompt batches, an incomplete last batch padded with copies (pad_rows) so the
compiled shape is kept, vision inputs padded up to a running floor (few compilations), the batch split
over the mesh's data axes when it divides, greedy decoding with the KV cache
(`model.generate.generate_device`) and each completion decoded up to its first stop token, special tokens
kept (the output format is made of them). Stop tokens: <|im_end|> and the model directory's
generation_config.json eos_token_id, as HF generate (`fxjax.hf_checkpoint.stop_token_ids`).
"""

from __future__ import annotations

from typing import Callable, Iterator

from fxjax.data.formats import IM_END
from fxjax.data.pipeline import DataPipeline, tokens_for
from fxjax.data.tokenizer import load_tokenizer, token_id
from fxjax.decode_weights import DecodePlan, decode_plan, weights_for_decoding
from fxjax.model.generate import generate_device
from fxjax.device_mesh import batch_shards, gather, require_batch_split, shard_inputs, splits_batch, use_mesh
from fxjax.hf_checkpoint import stop_token_ids
from fxjax.train.batching import pad_rows, pad_vision_inputs

__all__ = ["GreedyDecoder"]


class GreedyDecoder:
    """Greedy completions with the KV cache for the prompt batches of a DataPipeline in mode "prompt"."""

    def __init__(self, model, tokenizer: str, *, batch_size: int, max_new_tokens: int, mesh=None,
                 allow_replicated: bool = False, batch_name: str = "--batch-size",
                 gather_for_decoding: str = "auto", say: Callable[[str], None] | None = None,
                 gather_source: str = "mesh.gather_for_decoding"):
        """`model`: the Qwen25VL to decode with (may be set later, as the `model` attribute). A batch that
        does not divide over the mesh's batch devices is an error naming `batch_name` (every device would
        decode the whole batch), unless `allow_replicated` (the caller checked and warned).
        `gather_for_decoding` (`gather_source`: mesh.gather_for_decoding, or a command's flag): weights split
        over fsdp are gathered once per pass of `batches` (fxjax.decode_weights), decided at the first pass
        (or `plan_decoding`) and said through `say`."""
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        if mesh is not None and not allow_replicated:
            require_batch_split(mesh, batch_size, batch_name)
        self.model = model
        self.tokenizer = load_tokenizer(tokenizer)
        self.im_end = token_id(self.tokenizer, IM_END)
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.mesh = mesh
        self.pad_id = tokens_for(tokenizer).pad  # the pipeline's padding id
        self._floor: dict[str, int] = {}
        self.last_extents: list[dict] | None = None  # of the last `complete`: completion_tokens, truncated
        self.gather_for_decoding, self.gather_source = gather_for_decoding, gather_source
        self.plan: DecodePlan | None = None
        self.say = say

    def batches(self, pipeline: DataPipeline) -> Iterator[tuple[list[str], list[dict]]]:
        """(completions, the examples' meta) per batch, in the pipeline's order; each meta also carries
        ``completion_tokens`` (through the stop token) and ``truncated`` (no stop token within max_new_tokens)."""
        if pipeline.cfg.mode != "prompt" or pipeline.cfg.batch_size != self.batch_size:
            raise ValueError(f"GreedyDecoder needs a prompt pipeline of batch size {self.batch_size}, got mode "
                             f"{pipeline.cfg.mode!r} and batch size {pipeline.cfg.batch_size}")
        iterator = iter(pipeline)
        self.dropped = iterator.dropped_sources  # source -> kind of each record the pipeline left out
        decoding = self.decoding_model()  # (a gathered copy lives as long as this pass)
        try:
            for batch in iterator:
                self.last_extents = None
                texts = self.complete(batch, decoding)
                extents = self.last_extents or [{}] * len(texts)
                yield texts, [dict(meta, **extent) for meta, extent in zip(batch["meta"], extents)]
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def plan_decoding(self) -> DecodePlan:
        """Whether decoding gathers the weights (fxjax.decode_weights), decided once, for the model as it is
        placed now, and said (where some weight is split over fsdp)."""
        if self.plan is None:
            self.plan = decode_plan(self.model, self.gather_for_decoding, source=self.gather_source)
            if self.plan.splits and self.say is not None:
                self.say(f"greedy decoding: {self.plan.reason}")
        return self.plan

    def decoding_model(self):
        """The model to decode with: `model` in eval mode, its fsdp-split weights gathered when the plan
        says so."""
        self.model.eval()
        return weights_for_decoding(self.model, self.plan_decoding())

    def complete(self, batch: dict, model=None) -> list[str]:
        """Greedy completions of one prompt batch (up to batch_size rows), one text per row; with `model`
        (`decoding_model()`'s, reused over a pass) or else `model` as it is."""
        real = len(batch["meta"])
        stop = stop_token_ids(self.model, self.im_end)
        with use_mesh(self.mesh):  # traced under the mesh: activations' batch pinned, Splash per shard
            inputs = self.inputs(batch)
            out = generate_device(self.model if model is None else model, inputs, max_new_tokens=self.max_new_tokens,
                                  eos_token_ids=stop, pad_token_id=self.pad_id)
        tokens = gather(out.tokens)
        rows = [tokens[row].tolist() for row in range(real)]
        ends = [self.stop_at(ids, stop) for ids in rows]
        self.last_extents = [{"completion_tokens": min(end + 1, len(ids)), "truncated": end == len(ids)}
                             for ids, end in zip(rows, ends)]
        return [self.tokenizer.decode(ids[:end], skip_special_tokens=False) for ids, end in zip(rows, ends)]

    def inputs(self, batch: dict):
        """The model inputs of one prompt batch, as `complete` decodes them: rows padded to batch_size, vision
        inputs padded up to the running floor, split over the mesh's data axes when the batch divides."""
        model = self.model
        model.eval()
        batch = pad_rows(batch, self.batch_size)
        split = self.mesh is not None and splits_batch(self.mesh, self.batch_size)
        inputs = model.prepare(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                               batch["image_grid_thw"], batch_shards=batch_shards(self.mesh) if split else None)
        inputs, self._floor = pad_vision_inputs(inputs, model.config, self._floor)
        return shard_inputs(inputs, self.mesh) if split else inputs

    def stop_at(self, ids: list[int], stop: tuple[int, ...] | None = None) -> int:
        """Index of a row's first stop token (default <|im_end|>); len(ids) when it has none (truncated)."""
        stop = stop or (self.im_end,)
        return next((i for i, t in enumerate(ids) if t in stop), len(ids))

    def text(self, ids: list[int], stop: tuple[int, ...] | None = None) -> str:
        """One row's completion text: up to its first stop token (default <|im_end|>), special tokens kept."""
        return self.tokenizer.decode(ids[:self.stop_at(ids, stop)], skip_special_tokens=False)
