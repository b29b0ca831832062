"""Data: dataset formats and validation, prompts, the Qwen tokenizer, the grain pipeline, demo data.

Modules: records (Record, load_records) <- formats (native / ms-swift parsing) + images (paths, safe
opening); prompts; tokenizer; config (DataConfig); examples (record -> ids, labels, pixels); batching
(padding, buckets, the checkpointable iterator); pipeline (DataPipeline, the grain assembly); demo_data.

    records, report = load_records("data/train.jsonl")              # native or ms-swift JSONL, validated
    build_qwen_tokenizer("tok/")                                    # offline Qwen2.5-VL tokenizer
    pipeline = DataPipeline(DataConfig(data_files=("data/train.jsonl",), tokenizer="tok/"))
    it = iter(pipeline); batch = next(it); state = it.get_state()   # checkpointable
    make_demo_data("demo/", n=1000, seed=0)
"""

from fxjax.data.demo_data import make_demo_data
from fxjax.data.pipeline import DataConfig, DataPipeline, collate
from fxjax.data.prompts import SYSTEM_PROMPT, USER_TEMPLATES, pick_template, render_prompt, render_target
from fxjax.data.records import DataError, LoadReport, Record, Region, load_records
from fxjax.data.tokenizer import build_qwen_tokenizer, load_tokenizer

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
