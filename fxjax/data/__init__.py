"""Data: dataset formats and validation, prompts, the Qwen tokenizer, the grain pipeline, demo data.

Modules: records (Record, load_records) <- formats (native / ms-swift parsing) + images (paths, safe
opening) + file_layout (a whole file that is no JSONL) + path_hints (a missing image's near miss); prompts; tokenizer; config (DataConfig); examples (record -> ids, labels, pixels); batching
(padding, buckets, the checkpointable iterator); pipeline (DataPipeline, the grain assembly); demo_data.

    records, report = load_records("data/train.jsonl")              # native or ms-swift JSONL, validated
    build_qwen_tokenizer("tok/")                                    # offline Qwen2.5-VL tokenizer
    pipeline = DataPipeline(DataConfig(data_files=("data/train.jsonl",), tokenizer="tok/"))
    it = iter(pipeline); batch = next(it); state = it.get_state()   # checkpointable
    make_demo_data("demo/", n=1000, seed=0)
"""

from __future__ import annotations

from fxjax.lazy_exports import lazy_exports

# Loaded on first use (PEP 562), so `import fxjax.data.records` does not load grain and jax with the pipeline.
_EXPORTS = {
    "make_demo_data": "fxjax.data.demo_data",
    **dict.fromkeys(("DataConfig", "DataPipeline", "collate"), "fxjax.data.pipeline"),
    **dict.fromkeys(("SYSTEM_PROMPT", "USER_TEMPLATES", "pick_template", "render_prompt", "render_target"),
                    "fxjax.data.prompts"),
    **dict.fromkeys(("DataError", "LoadReport", "Record", "Region", "load_records"), "fxjax.data.records"),
    **dict.fromkeys(("build_qwen_tokenizer", "load_tokenizer"), "fxjax.data.tokenizer"),
}

__all__ = [
    "DataConfig",
    "DataError",
    "DataPipeline",
    "LoadReport",
    "Record",
    "Region",
    "SYSTEM_PROMPT",
    "USER_TEMPLATES",
    "build_qwen_tokenizer",
    "collate",
    "load_records",
    "load_tokenizer",
    "make_demo_data",
    "pick_template",
    "render_prompt",
    "render_target",
]


# its modules by name too (`fxjax.data.prompts.serving_prompt` after `import fxjax`, as the README writes it)
_SUBMODULES = ("batching", "config", "demo_data", "examples", "file_layout", "formats", "images", "path_hints",
               "pipeline", "prompts", "records", "tokenizer")
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals(), _SUBMODULES)
