"""The offline Qwen2.5-VL tokenizer: HF-loadable, exact special ids, tiktoken-equal, chat template."""

from __future__ import annotations

import random
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxjax.data import tokenizer as qtok
from fxjax.data.prompts import QWEN_DEFAULT_SYSTEM, SYSTEM_PROMPT, USER_TEMPLATES, render_prompt
from fxjax.rewards.output_format import FORMAT_MARKERS


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiktoken_encoding():
    import tiktoken

    return tiktoken.Encoding("qwen", pat_str=qtok.PRETOKENIZE_PATTERN, mergeable_ranks=qtok.load_ranks(),
                             special_tokens={})


# Qwen2.5-VL's special token ids, plus the rest of Qwen2.5's 151643..151664 and the six format markers.
EXPECTED_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647, "<|box_start|>": 151648, "<|box_end|>": 151649, "<|quad_start|>": 151650,
    "<|quad_end|>": 151651, "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
    "<|fim_prefix|>": 151659, "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664,
    "<think>": 151665, "</think>": 151666, "<tag>": 151667, "</tag>": 151668, "<verdict>": 151669,
    "</verdict>": 151670,
}


def test_autotokenizer_loads_with_exact_special_ids(hf_tokenizer, tokenizer_dir):
    assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"
    assert len(hf_tokenizer) == 151671 <= 151936  # fits the tiny preset's (and 3B's) embedding table
    assert {t: hf_tokenizer.convert_tokens_to_ids(t) for t in EXPECTED_IDS} == EXPECTED_IDS
    assert hf_tokenizer.eos_token == "<|im_end|>" and hf_tokenizer.pad_token_id == 151643
    raw = qtok.load_tokenizer(tokenizer_dir)
    assert {t: raw.token_to_id(t) for t in EXPECTED_IDS} == EXPECTED_IDS
    assert raw.get_vocab_size() == 151671
    assert qtok.FORMAT_MARKER_IDS == {m: EXPECTED_IDS[m] for m in FORMAT_MARKERS}
    # Markers are single special tokens in running text, never split into sub-words.
    ids = hf_tokenizer.encode("<think> a</think>\n<tag>x</tag><verdict>real</verdict>", add_special_tokens=False)
    assert [i for i in ids if i >= 151643] == [151665, 151666, 151667, 151668, 151669, 151670]


def test_known_encodings(hf_tokenizer):
    # Ids of Qwen's released tokenizer (same ranks): "Hello world" -> [9707, 1879].
    assert hf_tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    # Digits are split one by one (\p{N}, not \p{N}{1,3}).
    assert len(hf_tokenizer.encode("12345", add_special_tokens=False)) == 5


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ([chr(c) for c in range(32, 127)] * 4 + [chr(c) for c in range(0xA0, 0x250)]
                + [chr(c) for c in range(0x4E00, 0x4E00 + 400)] + [chr(c) for c in range(0x1F600, 0x1F650)]
                + [chr(c) for c in range(0x3040, 0x30FF)] + [chr(c) for c in range(0x400, 0x4FF)]
                + ["\n", "\t", "  ", "\r\n", "'s", "'LL", "\u200b", "\u0301"])
    words = ["the", "quick", "brown", "fox", "Hello", "world", "generated", "texture", "1234", "...", "!!",
             "don't", "   ", "\n\n", "été", "ﬁ"]
    return [unicodedata.normalize("NFC", "".join(
        rng.choice(alphabet) if rng.random() < 0.6 else rng.choice(words) + " " for _ in range(rng.randint(1, 50))))
        for _ in range(n)]


def test_agrees_with_tiktoken_on_random_strings(hf_tokenizer, tokenizer_dir, tiktoken_encoding):
    raw = qtok.load_tokenizer(tokenizer_dir)
    strings = _random_strings(400)
    hf = hf_tokenizer(strings, add_special_tokens=False)["input_ids"]
    fast = [e.ids for e in raw.encode_batch(strings, add_special_tokens=False)]
    ref = tiktoken_encoding.encode_ordinary_batch(strings)
    mismatches = [s for s, a, b, r in zip(strings, hf, fast, ref) if not (a == r and b == r)]
    assert not mismatches, f"{len(mismatches)} strings differ from tiktoken, e.g. {mismatches[0]!r}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=80))
def test_encode_decode_round_trips_unicode(hf_tokenizer, text):
    text = unicodedata.normalize("NFC", text)  # Qwen's normaliser is NFC, as in its released tokenizer
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    assert hf_tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def test_chat_template_renders_qwen25vl_format(hf_tokenizer):
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": USER_TEMPLATES[3]}]}]
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_prompt(SYSTEM_PROMPT, USER_TEMPLATES[3], image_tokens=1)
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|><|image_pad|><|vision_end|>{USER_TEMPLATES[3]}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # No system message: Qwen's default one; an assistant turn closes with <|im_end|>\n.
    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
         {"role": "assistant", "content": "<think> x\n</think>\n<verdict>real</verdict>"}], tokenize=False)
    assert text == (render_prompt(QWEN_DEFAULT_SYSTEM, "hi")
                    + "<think> x\n</think>\n<verdict>real</verdict><|im_end|>\n")


def test_ensure_format_markers_extends_a_stock_tokenizer():
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz<>/")}
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    assert qtok.ensure_format_markers(tok) == list(FORMAT_MARKERS)
    assert [tok.token_to_id(m) for m in FORMAT_MARKERS] == list(range(len(vocab) + 1, len(vocab) + 7))
    assert qtok.ensure_format_markers(tok) == []  # idempotent


def test_load_tokenizer_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_qwen_tokenizer"):
        qtok.load_tokenizer(tmp_path)


def test_export_adds_the_format_markers_to_a_stock_tokenizer_as_special_tokens(tmp_path):
    """A stock tokenizer (without the markers) exported next to a model: each marker is in tokenizer.json and
    in tokenizer_config.json as a special added token, as the tokenizer the model trained with has them."""
    import json

    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    stock = tmp_path / "stock"
    stock.mkdir()
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz<>/")}
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    tok.save(str(stock / "tokenizer.json"))
    (stock / "tokenizer_config.json").write_text(json.dumps({"additional_special_tokens": ["<|im_end|>"]}))
    out = qtok.export_tokenizer(stock, tmp_path / "out")
    exported = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    for marker in FORMAT_MARKERS:
        entry = config["added_tokens_decoder"][str(exported.token_to_id(marker))]
        assert entry["content"] == marker and entry["special"] is True, marker
        assert marker in config["additional_special_tokens"]
    assert config["additional_special_tokens"][0] == "<|im_end|>"  # the stock ones kept
