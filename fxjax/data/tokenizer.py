"""The Qwen2.5-VL tokenizer, built offline from the BPE ranks that ship with ``dashscope``.

``build_qwen_tokenizer(out_dir)`` writes ``tokenizer.json`` + ``tokenizer_config.json`` (with the
Qwen2.5-VL chat template) that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads:

* base vocabulary: the 151643 byte-level BPE tokens of ``qwen.tiktoken`` (rank = id); merges are
  derived from the ranks the standard tiktoken -> HF way (simulate BPE of every token with the ranks
  below its own; a token reached by exactly one final merge yields that merge), with
  ``ignore_merges`` so a pre-token that is itself in the vocabulary maps to it directly, as tiktoken does;
* normaliser NFC, pre-tokeniser = Qwen's split regex (``PRETOKENIZE_PATTERN``) then ByteLevel, as in
  Qwen2's own ``tokenizer.json``;
* the 22 Qwen2.5 special tokens at 151643..151664 and the six output-format markers
  (``<think> </think> <tag> </tag> <verdict> </verdict>``) at 151665..151670.

``load_tokenizer(path)`` returns a ``tokenizers.Tokenizer`` for the data pipeline (no transformers
import, cheap in worker processes) and adds the format markers when a checkpoint's tokenizer lacks them.
``export_tokenizer(source, out_dir)`` writes that same tokenizer (files, chat template, markers) next to
exported weights, so the directory loads with ``AutoTokenizer`` on its own.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

from fxjax.rewards.output_format import FORMAT_MARKERS

__all__ = [
    "CHAT_TEMPLATE",
    "FORMAT_MARKER_IDS",
    "NUM_BASE_TOKENS",
    "PRETOKENIZE_PATTERN",
    "QWEN_SPECIAL_TOKENS",
    "build_qwen_tokenizer",
    "cached_qwen_tokenizer",
    "default_ranks_path",
    "ensure_format_markers",
    "export_tokenizer",
    "load_ranks",
    "load_tokenizer",
    "token_id",
]

NUM_BASE_TOKENS = 151643
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# (token, special) in id order from 151643, as Qwen2.5 ships them; the tool/FIM tokens are not special there.
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
FORMAT_MARKER_IDS: dict[str, int] = {
    m: NUM_BASE_TOKENS + len(QWEN_SPECIAL_TOKENS) + i for i, m in enumerate(FORMAT_MARKERS)
}

# Qwen2.5-VL-*-Instruct's chat_template (images/videos as content parts, default system prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


PROCESSOR_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


def default_ranks_path() -> Path:
    """dashscope/resources/qwen.tiktoken, located without importing dashscope (which pulls in network code)."""
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Qwen BPE ranks ship in the PyPI package 'dashscope'; install it "
                                "or pass ranks_path= to qwen.tiktoken")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed dashscope")
    return path


def load_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """tiktoken's file format: one ``base64(token) rank`` per line."""
    path = Path(path) if path is not None else default_ranks_path()
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (what ByteLevel pre-tokenisation uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_map = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[tuple[int, str, str]] = []
    for token, rank in ranks.items():
        vocab[to_str(token)] = rank
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) == 2:
                merges.append((rank, to_str(parts[0]), to_str(parts[1])))
    merges.sort()
    return vocab, [(a, b) for _, a, b in merges]


def build_qwen_tokenizer(out_dir: str | Path, ranks_path: str | Path | None = None,
                         model_max_length: int = 131072) -> Path:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja for Qwen2.5-VL (+ format markers)
    into ``out_dir``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    ranks = load_ranks(ranks_path)
    if len(ranks) != NUM_BASE_TOKENS:
        raise ValueError(f"expected {NUM_BASE_TOKENS} base tokens, the ranks file has {len(ranks)}")
    vocab, merges = _vocab_and_merges(ranks)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    added = [(t, s) for t, s in QWEN_SPECIAL_TOKENS] + [(m, True) for m in FORMAT_MARKERS]
    # add_tokens/add_special_tokens assign the next free id, i.e. 151643, 151644, ... in this order.
    for text, special in added:
        token = AddedToken(text, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    for i, (text, _) in enumerate(added):
        if tok.token_to_id(text) != NUM_BASE_TOKENS + i:
            raise AssertionError(f"{text} got id {tok.token_to_id(text)}, expected {NUM_BASE_TOKENS + i}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    decoder = {
        str(NUM_BASE_TOKENS + i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": special}
        for i, (text, special) in enumerate(added)
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t, s in added if s and t not in ("<|endoftext|>", "<|im_end|>")],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    write_processor_template(out, CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def cached_qwen_tokenizer(cache_root: str | Path, ranks_path: str | Path | None = None) -> Path:
    """``build_qwen_tokenizer`` into ``cache_root/qwen_tokenizer_<key>`` unless already there; the key hashes
    this module's source and the ranks file, so a changed builder or ranks file builds afresh."""
    import hashlib

    ranks = Path(ranks_path) if ranks_path is not None else default_ranks_path()
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{ranks.resolve()}:{ranks.stat().st_size}:{ranks.stat().st_mtime_ns}".encode())
    out = Path(cache_root) / f"qwen_tokenizer_{digest.hexdigest()[:16]}"
    if not (out / "tokenizer_config.json").is_file():  # written last: its presence means a complete build
        build_qwen_tokenizer(out, ranks)
    return out


def ensure_format_markers(tok) -> list[str]:
    """Add any of the six format markers that ``tok`` (a tokenizers.Tokenizer) lacks; returns those added.

    The authors add them as special tokens on top of the stock Qwen2.5-VL tokenizer (151665 tokens), so
    they get ids 151665..151670 there too; the embedding table (151936 / 152064 rows) has room.
    """
    from tokenizers import AddedToken

    missing = [m for m in FORMAT_MARKERS if tok.token_to_id(m) is None]
    for m in missing:
        tok.add_special_tokens([AddedToken(m, special=True, normalized=False)])
    return missing


def tokenizer_json(path: str | Path) -> Path | None:
    """The tokenizer.json a model or tokenizer directory holds, or `path` itself when it is that file; None
    when there is none (the one test of "this names a tokenizer": each caller says in its own words what to
    give instead)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    return file if file.is_file() else None


def load_tokenizer(path: str | Path, add_format_markers: bool = True):
    """A ``tokenizers.Tokenizer`` from a model/tokenizer directory (its tokenizer.json) or a tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a model or tokenizer directory holding "
                                f"tokenizer.json)")
    file = tokenizer_json(path)
    if file is None:
        raise FileNotFoundError(f"no tokenizer.json in {path}; build one with "
                                "fxjax.data.tokenizer.build_qwen_tokenizer(dir)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"{file} is not a tokenizer.json ({err}); give a model or tokenizer directory holding "
                         "tokenizer.json") from None
    if add_format_markers:
        ensure_format_markers(tok)
    return tok


# The files a Hugging Face tokenizer directory may hold (the image processor's are the model's business).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja")


def write_processor_template(out_dir: Path, template: str) -> None:
    """chat_template.jinja: transformers' processors read their chat template only from it (or
    chat_template.json), not from tokenizer_config.json, and `processor.apply_chat_template`, what
    Qwen2.5-VL's model cards serve with, needs one."""
    (Path(out_dir) / "chat_template.jinja").write_text(template, encoding="utf-8")


def export_tokenizer(source: str | Path, out_dir: str | Path) -> Path:
    """Write the tokenizer training used into `out_dir`: the tokenizer files of the model or tokenizer
    directory `source`, with the six format markers added when `source` lacks them (as `load_tokenizer`
    adds them, at the same ids) and Qwen2.5-VL's chat template when it has none, so that
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` encodes exactly what the model was trained on."""
    from tokenizers import Tokenizer

    src, out = Path(source), Path(out_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist or is not a directory (expected a model or tokenizer "
                                f"directory holding tokenizer.json)")
    if tokenizer_json(src) is None:
        raise FileNotFoundError(f"no tokenizer.json in {src}")
    out.mkdir(parents=True, exist_ok=True)
    if src.resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)  # not shutil.copy: the new file gets the usual mode
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    added = ensure_format_markers(tok)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    if added:
        tok.save(str(out / "tokenizer.json"))
        decoder = config.setdefault("added_tokens_decoder", {})
        for marker in added:
            decoder[str(tok.token_to_id(marker))] = {"content": marker, "lstrip": False, "normalized": False,
                                                     "rstrip": False, "single_word": False, "special": True}
        key = "extra_special_tokens" if isinstance(config.get("extra_special_tokens"), list) \
            else "additional_special_tokens"
        config[key] = [*(config.get(key) or []), *(m for m in added if m not in (config.get(key) or []))]
    processor_template = any((out / n).is_file() for n in PROCESSOR_TEMPLATE_FILES)
    has_template = config.get("chat_template") or processor_template
    if not has_template:
        config["chat_template"] = CHAT_TEMPLATE
    if not processor_template and isinstance(config["chat_template"], str):
        write_processor_template(out, config["chat_template"])
    if added or not has_template:
        config.setdefault("tokenizer_class", "Qwen2Tokenizer")
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def token_id(tok, text: str) -> int:
    """Id of a single (special) token; raises if the tokenizer does not have it."""
    i = tok.token_to_id(text)
    if i is None:
        raise ValueError(f"tokenizer has no token {text!r}")
    return int(i)
