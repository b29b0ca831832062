"""What an export writes: safetensors readable by others (0666 minus the umask), and a merged directory
that carries the tokenizer training used (format markers and chat template) and the image processor's
config, so transformers' Auto classes load it with nothing else at hand."""

from __future__ import annotations

import json
import os
import shutil
import stat

import numpy as np
import pytest

from fxjax.data.tokenizer import FORMAT_MARKER_IDS
from fxjax.rewards.output_format import FORMAT_MARKERS


@pytest.fixture
def umask_027():
    """A umask that differs from the usual 022, so a test sees it respected, not a fixed 0644."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def stock_tokenizer(tokenizer_dir, out):
    """The offline Qwen2.5-VL tokenizer without the six format markers: what a Hub checkpoint ships."""
    out.mkdir()
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] not in FORMAT_MARKERS]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v for k, v in config["added_tokens_decoder"].items()
                                      if v["content"] not in FORMAT_MARKERS}
    config["additional_special_tokens"] = [t for t in config["additional_special_tokens"] if t not in FORMAT_MARKERS]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_merged_export_is_self_contained_and_readable(tiny_checkpoint, tokenizer_dir, tmp_path, umask_027):
    from PIL import Image
    from skimage import data
    from transformers import AutoImageProcessor, AutoTokenizer

    import fxjax
    from fxjax.model.lora import LoRAConfig
    from fxjax.train.export import save_adapter, save_merged

    stock = stock_tokenizer(tokenizer_dir, tmp_path / "stock")

    model = fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2, alpha=4))
    merged = save_merged(model, tmp_path / "merged", tokenizer_dir=stock, image_pixels=(3136, 12544))
    adapter = save_adapter(model, tmp_path / "adapter", tokenizer_dir=stock)

    weights = sorted(merged.glob("*.safetensors")) + [adapter / "adapter_model.safetensors"]
    assert len(weights) >= 2 and all(mode(w) == 0o640 for w in weights), [oct(mode(w)) for w in weights]

    tok = AutoTokenizer.from_pretrained(merged)
    for marker in FORMAT_MARKERS:  # the ids training used (load_tokenizer adds them the same way)
        assert tok.encode(marker) == [FORMAT_MARKER_IDS[marker]]
    # the adapter's folder holds the same tokenizer: a Hub base's lacks the markers, so a peft server that
    # took the base's decoded an answer's markers as nothing
    assert AutoTokenizer.from_pretrained(adapter).get_vocab() == tok.get_vocab()
    assert FORMAT_MARKERS[0] not in AutoTokenizer.from_pretrained(stock).get_vocab()
    text = "<think>a seam</think>\n<verdict>generated</verdict>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "a seam\ngenerated"
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Real?"}]}],
                                     add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|vision_start|><|image_pad|><|vision_end|>Real?<|im_end|>\n<|im_start|>assistant\n")

    image = Image.fromarray(data.chelsea())
    processed = AutoImageProcessor.from_pretrained(merged)(images=[image], return_tensors="np")
    pixel_values, grid = fxjax.process_image(image, min_pixels=3136, max_pixels=12544)
    assert np.array_equal(processed["image_grid_thw"], grid)
    assert np.abs(processed["pixel_values"] - pixel_values).max() == 0.0

    from transformers import Qwen2_5_VLProcessor

    # the processor's chat template (`processor.apply_chat_template`, as model cards serve) is the tokenizer's
    assert Qwen2_5_VLProcessor.get_processor_dict(merged)[0]["chat_template"] == tok.chat_template


def test_merged_export_decodes_greedily_as_eval_and_detect(tiny_checkpoint, tmp_path):
    """The base's generation_config.json (Qwen2.5-VL-Instruct's: sampling settings and a repetition penalty,
    which HF generate and vLLM apply by default) becomes greedy decoding; its stop tokens stay."""
    from transformers import GenerationConfig

    import fxjax
    from fxjax.train.export import save_merged

    base = tmp_path / "instruct"
    shutil.copytree(tiny_checkpoint, base)
    instruct = {"bos_token_id": 1, "pad_token_id": 0, "do_sample": True, "eos_token_id": [2, 3],
                "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}
    (base / "generation_config.json").write_text(json.dumps(instruct))
    merged = save_merged(fxjax.from_pretrained(base), tmp_path / "merged")
    config = GenerationConfig.from_pretrained(merged)
    assert config.do_sample is False and config.repetition_penalty == GenerationConfig().repetition_penalty
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == ([2, 3], 0, 1)
    assert config.temperature == GenerationConfig().temperature and config.top_k == GenerationConfig().top_k


def test_merged_export_loads_as_a_processor(tiny_checkpoint, tokenizer_dir, tmp_path):
    """AutoProcessor (what serving code calls) reads the export's tokenizer with the format markers. Skipped
    without torchvision, which transformers' Qwen2.5-VL video processor needs (the PyPI wheel does not load
    with the CPU torch of the test extra; a GPU machine's torch has it)."""
    pytest.importorskip("torchvision")
    from transformers import AutoProcessor

    import fxjax
    from fxjax.train.export import save_merged

    model = fxjax.from_pretrained(tiny_checkpoint)
    merged = save_merged(model, tmp_path / "merged", tokenizer_dir=stock_tokenizer(tokenizer_dir, tmp_path / "stock"))
    assert AutoProcessor.from_pretrained(merged).tokenizer.encode("<tag>") == [FORMAT_MARKER_IDS["<tag>"]]


def test_export_defaults_to_the_model_directory_tokenizer(tiny_checkpoint, tokenizer_dir, tmp_path):
    import fxjax
    from fxjax.train.export import save_merged

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    stock_tokenizer(tokenizer_dir, tmp_path / "stock")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "stock" / name, base / name)
    merged = save_merged(fxjax.from_pretrained(base), tmp_path / "merged")
    config = json.loads((merged / "tokenizer_config.json").read_text())
    assert {config["added_tokens_decoder"][str(i)]["content"] for i in FORMAT_MARKER_IDS.values()} == set(FORMAT_MARKERS)
    assert json.loads((merged / "preprocessor_config.json").read_text())["max_pixels"] == 12845056  # the default


def test_an_adapter_is_not_applied_twice_on_the_export_it_is_merged_into(tiny_checkpoint, tmp_path):
    """A merged export records the fingerprint of the LoRA in its weights; loading it again with that adapter
    (looped or scan layers) is refused, while the base model with the adapter, the export alone and the
    export with another adapter load. Re-exporting keeps the earlier fingerprints."""
    import fxjax
    from fxjax.merged_lora import MERGED_LORA_FILE, MergedLoRAError, lora_fingerprint
    from fxjax.peft_io import load_peft_adapter
    from fxjax.model.lora import LoRAConfig, lora_linears
    from fxjax.train.export import save_adapter, save_merged

    def trained(model, seed):
        rng = np.random.default_rng(seed)
        for _, linear in lora_linears(model):
            linear.lora.lora_b[...] = rng.normal(size=linear.lora.lora_b.shape).astype(np.float32) * 0.1
        return model

    model = trained(fxjax.from_pretrained(tiny_checkpoint, lora=LoRAConfig(rank=2, alpha=4)), 0)
    merged = save_merged(model, tmp_path / "merged")
    adapter = save_adapter(model, tmp_path / "adapter")
    assert lora_fingerprint(fxjax.from_pretrained(tiny_checkpoint, adapter=adapter)) == lora_fingerprint(model)
    for scan in (False, True):
        with pytest.raises(MergedLoRAError, match="already merged into the weights of .*add its update twice"):
            fxjax.from_pretrained(merged, adapter=adapter, scan_layers=scan)
    assert lora_fingerprint(fxjax.from_pretrained(merged)) is None
    plain = fxjax.from_pretrained(merged)
    with pytest.raises(MergedLoRAError, match="already merged"):  # the same through the adapter loader ...
        load_peft_adapter(plain, adapter)
    assert lora_fingerprint(plain) is None and plain.lora_config is None  # ... which leaves the model as it was
    half = save_adapter(model, tmp_path / "adapter16", dtype="float16")  # float16 rounds some values elsewhere
    with pytest.raises(MergedLoRAError, match="already merged"):
        fxjax.from_pretrained(merged, adapter=half)

    second = trained(fxjax.from_pretrained(merged, lora=LoRAConfig(rank=2, alpha=4), lora_seed=1), 1)
    other = save_adapter(second, tmp_path / "other")
    merged_twice = save_merged(second, tmp_path / "merged_twice")
    assert len(json.loads((merged_twice / MERGED_LORA_FILE).read_text())["merged_adapters"]) == 4  # 2 x (as saved, float16)
    for done in (adapter, other):
        with pytest.raises(MergedLoRAError, match="already merged"):
            fxjax.from_pretrained(merged_twice, adapter=done)
    save_merged(fxjax.from_pretrained(tiny_checkpoint), merged_twice)  # no LoRA: the record goes with the weights
    assert not (merged_twice / MERGED_LORA_FILE).exists()
    fxjax.from_pretrained(merged_twice, adapter=other)
    # fxjax.save_pretrained into a folder that held a merged export (it writes in place): the stale record goes
    fxjax.save_pretrained(fxjax.from_pretrained(tiny_checkpoint), merged)
    assert not (merged / MERGED_LORA_FILE).exists()
    fxjax.from_pretrained(merged, adapter=adapter)  # plain base weights now: the adapter applies once


def test_an_export_replaces_its_folder_whole_and_a_failure_leaves_the_former_one(tiny_checkpoint, tokenizer_dir,
                                                                                 tmp_path, monkeypatch):
    """The pixel limits reach transformers 5's processor_config.json too (AutoImageProcessor reads its nested
    image_processor first); a second export replaces the folder (no stale shard stays); a missing tokenizer
    is refused before any weights are written; a failure part-way leaves the former export whole; the
    adapter names its base by an absolute path (the model was loaded by a relative one)."""
    from transformers import AutoImageProcessor

    import fxjax
    import fxjax.data.tokenizer
    from fxjax.model.lora import LoRAConfig
    from fxjax.train.export import save_adapter, save_merged, written_whole

    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    image = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "temporal_patch_size": 2,
             "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
             "size": {"shortest_edge": 3136, "longest_edge": 12845056}}
    (base / "preprocessor_config.json").write_text(json.dumps(image))
    (base / "processor_config.json").write_text(json.dumps({"image_processor": image,
                                                            "processor_class": "Qwen2_5_VLProcessor"}))
    monkeypatch.chdir(tmp_path)
    model = fxjax.from_pretrained("base", lora=LoRAConfig(rank=2, alpha=4))
    out = tmp_path / "merged"
    save_merged(model, out, image_pixels=(3136, 12544))
    assert AutoImageProcessor.from_pretrained(out).size["longest_edge"] == 12544
    # both files and both spellings of the limits, as any server reads them (transformers also rebuilds
    # `size` from min_pixels / max_pixels, so the processor above would not see a swapped `size`)
    written = json.loads((out / "preprocessor_config.json").read_text())
    nested = json.loads((out / "processor_config.json").read_text())["image_processor"]
    for config in (written, nested):
        assert (config["min_pixels"], config["max_pixels"]) == (3136, 12544)
        assert config["size"] == {"shortest_edge": 3136, "longest_edge": 12544}
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    save_merged(model, out, tokenizer_dir=tokenizer_dir, image_pixels=(3136, 6272))
    assert not (out / "model-00009-of-00009.safetensors").exists()
    assert AutoImageProcessor.from_pretrained(out).size["longest_edge"] == 6272
    former = {f.name: f.read_bytes() for f in out.iterdir()}

    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in {tmp_path / 'stock'}"):
        save_merged(model, out, tokenizer_dir=tmp_path / "stock")
    assert not (tmp_path / ".merged.partial").exists()  # refused before writing anything

    def broken(source, folder):
        raise RuntimeError("disk full")

    monkeypatch.setattr(fxjax.data.tokenizer, "export_tokenizer", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_merged(model, out, tokenizer_dir=tokenizer_dir, image_pixels=(3136, 3136))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == former
    assert not (tmp_path / ".merged.partial").exists()  # the failed attempt's files go with it (a full disk)
    # killed between its two renames, an export leaves the former one in .merged.replaced and no `out`: the
    # next export puts it back before it writes, so that one failing too still leaves it whole
    out.rename(tmp_path / ".merged.replaced")
    with pytest.raises(RuntimeError, match="disk full"):
        save_merged(model, out, tokenizer_dir=tokenizer_dir, image_pixels=(3136, 3136))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == former
    assert not (tmp_path / ".merged.replaced").exists()

    # a file where the export goes is refused (not replaced); a file left as .NAME.replaced is cleared
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'notes'} is a file, not a folder"):
        written_whole(tmp_path / "notes", lambda folder: folder.mkdir())
    assert (tmp_path / "notes").read_text() == "mine"
    (tmp_path / ".merged.replaced").write_text("stray")
    written_whole(out, lambda folder: (folder.mkdir(), (folder / "x").write_text("new")))
    assert [f.name for f in out.iterdir()] == ["x"] and not (tmp_path / ".merged.replaced").exists()

    adapter = json.loads((save_adapter(model, "adapter") / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())


def test_the_chat_templates_default_system_prompt_is_any_text_as_written(tokenizer_dir):
    """A system prompt of braces, quotes, newlines, Jinja's own delimiters and characters beyond the BMP goes
    into Qwen's chat template as text (a Jinja string), renders exactly as an explicit system message does,
    and an export of an export replaces it again (it is not nested, nor left at the first run's). A template
    without Qwen's default (another model family's) is left alone."""
    from transformers import AutoTokenizer

    from fxjax.data.tokenizer import CHAT_TEMPLATE
    from fxjax.train.export import set_template_system_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Real or generated?"}]}]
    tricky = 'Say "{{ x }}" {% if %} {# no #} \\n and\nthen \U0001F600 [x1, y1] <|box_start|>'
    template = set_template_system_prompt(CHAT_TEMPLATE, tricky)
    again = set_template_system_prompt(template, "second")
    for text, t in ((tricky, template), ("second", again)):
        assert tokenizer.apply_chat_template(user, chat_template=t, add_generation_prompt=True, tokenize=False) == \
            tokenizer.apply_chat_template([{"role": "system", "content": text}, *user], chat_template=CHAT_TEMPLATE,
                                          add_generation_prompt=True, tokenize=False)
    assert again == set_template_system_prompt(CHAT_TEMPLATE, "second")
    assert set_template_system_prompt("{% for m in messages %}{{ m['content'] }}{% endfor %}", "x") is None
