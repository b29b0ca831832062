"""What a dataset record is, and :func:`load_records`, which reads JSONL files and validates every record.

    records, report = load_records(["train.jsonl"], on_error="skip")   # native or ms-swift, mixed per line

Loading is two passes. Pass 1 reads the files in order and parses each line (fxjax.data.formats: the
native and the ms-swift format, including the paper's FakeXplain release) and checks its image path's text
(fxjax.data.images: relative to the dataset root, by default the JSONL file's folder; absolute paths only
with ``allow_absolute_paths``). Pass 2 resolves the paths and opens the images in threads (links out of the
root refused, size limits, EXIF orientation, ``check_decode`` decodes them fully once; the processes of a run
split them, :class:`ImageShare`: on a network disk every lookup is a round trip) and checks every box
against its image.

Every problem is a :class:`DataError` whose message starts with ``file:line``. ``on_error="raise"``
raises the first one in file order; ``"skip"`` drops those records, logs each (in file order) and counts
them by kind in the :class:`LoadReport`, whose ``summary()`` is logged at the end. A file without a
single record (empty, or blank lines only) is an error in both modes: it is almost always a wrong path.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from fxjax.data.file_layout import whole_file_problem
from fxjax.data.formats import (SWIFT_BBOX, SWIFT_IMAGE, SWIFT_REF, ParsedRecord, RecordProblem, boxes_in_pixels,
                                misspelt_fields, parse_record)
from fxjax.data.images import (ALLOWED_IMAGE_FORMATS, DEFAULT_MAX_IMAGE_PIXELS, ImageError, exif_orientation,
                               image_path_in_root, image_size, open_image, outside_root_problem,
                               resolve_image_path)
from fxjax.data.path_hints import missing_image_hint

__all__ = [
    "ALLOWED_IMAGE_FORMATS",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DataError",
    "ImageShare",
    "LOGGED_PER_KIND",
    "LoadReport",
    "Record",
    "Region",
    "SWIFT_BBOX",
    "SWIFT_IMAGE",
    "SWIFT_REF",
    "first_of_each_kind",
    "left_out_note",
    "load_records",
    "line_at",
    "numbered_line_spans",
    "numbered_lines",
    "open_image",
    "record_lines",
    "record_objects",
    "resolve_image_path",
    "whole_file_problem",
]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A bad record: ``where`` is ``file:line``, ``kind`` a short category used for counting skips."""

    def __init__(self, where: str, problem: str, kind: str = "invalid"):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem, self.kind = where, problem, kind

    def __reduce__(self):  # picklable across grain worker processes
        return DataError, (self.where, self.problem, self.kind)


@dataclass(frozen=True)
class Region:
    caption: str
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels


@dataclass(frozen=True)
class Record:
    """One validated example; ``index`` is its position among the loaded records (stable id for seeding)."""

    index: int
    source: str  # "file:line"
    record_id: str
    image: str  # absolute path (inside the dataset root unless absolute paths were allowed)
    width: int  # original size (after EXIF orientation)
    height: int
    label: str  # "real" | "generated"
    regions: tuple[Region, ...] = ()
    tags: tuple[str, ...] = ()
    reasoning: str = ""
    generator: str | None = None
    format: str = "native"  # "native" | "swift"
    # ms-swift only: the record's own prompts and the assistant text with its placeholders.
    system: str | None = None
    user: str | None = None
    assistant: str | None = None


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    lines: int = 0
    loaded: int = 0
    skipped: list[DataError] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # keys that look misspelt (also logged as warnings)
    # with a limit: (record id, label, image file name) of each record after the first `limit` valid ones,
    # whose image was not checked (`records_fingerprint` counts them: another limit resumes the same eval)
    unchecked: list[tuple[str, str, str]] = field(default_factory=list)

    def counts(self) -> Counter:
        return Counter(e.kind for e in self.skipped)

    def summary(self) -> str:
        text = f"loaded {self.loaded} of {self.lines} records from {', '.join(self.files)}"
        if self.skipped:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.counts().items()))
            text += f"; skipped {len(self.skipped)} ({kinds})"
        if self.unchecked:
            text += f"; the images of the {len(self.unchecked)} after them not checked (a limit of {self.loaded})"
        return text


@dataclass(frozen=True)
class _Pending:
    """A record that passed pass 1: where it is, what it says, its image path as written under the dataset
    root (resolved in pass 2, with the images: on a network disk each resolution is a round trip per file) and
    that root (resolved)."""

    position: tuple[int, int]  # (file number, line number): the order errors are reported in
    where: str
    parsed: ParsedRecord
    path: Path
    declared: tuple[float, float] | None = None  # the record's own "width" and "height", where it gives both
    root: Path | None = None


def numbered_lines(path: Path) -> Iterable[tuple[int, bytes]]:
    """The file's lines as bytes, numbered as a text editor does (\n, \r\n or \r ends a line), a leading
    BOM (Windows editors) dropped. Bytes, so that a line that is not UTF-8 is that line's error (decoding
    the file as text reports it on whichever line its read-ahead chunk began)."""
    for n, _, raw in numbered_line_spans(path):
        yield n, raw


def numbered_line_spans(path: Path) -> Iterable[tuple[int, int, bytes]]:
    """(number, byte offset, bytes) of each line, as `numbered_lines` numbers them: `line_at(path, offset,
    len(bytes))` reads one back without the rest of the file."""
    with open(path, "rb") as f:
        n = offset = 0
        for chunk in f:
            for part in chunk.splitlines(keepends=True) or [b""]:  # b"\r" is never inside a UTF-8 character
                n += 1
                raw, start = part.rstrip(b"\r\n"), offset  # (a part holds one separator: \n, \r\n or \r)
                if n == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
                offset += len(part)
                yield n, start, raw


def line_at(path: str | Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def record_objects(records: Iterable) -> dict[str, dict]:
    """source (file:line) -> the record's JSON object as its file holds it: the keys fxjax does not model
    (`fxjax eval --group-by`)."""
    return {source: json.loads(raw) for source, _, _, raw in record_lines(records)}


def record_lines(records: Iterable) -> Iterable[tuple[str, str, int, bytes]]:
    """(source file:line, file, byte offset, the line's bytes) of each record, one line at a time, in file
    order: `line_at(file, offset, len(bytes))` reads it again. Numbered as load_records numbers them (a lone "\r" ends a line too: a file
    with "\r\r\n" ends took other records' values); bytes, so a line that is not UTF-8 (skipped there under
    --on-error skip) is never decoded."""
    wanted: dict[str, set[int]] = {}
    for r in records:
        file, _, line = r.source.rpartition(":")
        wanted.setdefault(file, set()).add(int(line))
    for file, lines in wanted.items():
        for n, offset, raw in numbered_line_spans(Path(file)):
            if n in lines:
                yield f"{file}:{n}", file, offset, raw


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(where, f"not valid UTF-8: {err}", "json") from None


class _RepeatedKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise _RepeatedKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


_PYTHON_WORDS = {"True": "true", "False": "false", "None": "null"}


def _json_hint(line: str, err: json.JSONDecodeError) -> str:
    """What the commonest hand-written (or str()-written) mistakes are, said plainly after json's message."""
    if line.lstrip().startswith(("#", "//")):
        return " (JSON Lines has no comments: delete the line)"
    at, before = line[err.pos:], line[:err.pos].rstrip()
    if at[:1] in ("}", "]") and before.endswith(","):
        return f" (a comma before {at[0]!r}: JSON allows no trailing comma)"
    if err.msg == "Extra data":  # (a record is done and the line goes on)
        if at.lstrip().startswith(","):
            return " (a comma after the record: JSON Lines separates records by line breaks only)"
        if at.lstrip().startswith("{"):
            return " (a second record on the same line: one record per line)"
    if at[:1] == "'":
        return (" (JSON strings take double quotes; a Python dict written with str() or print: write "
                "json.dumps(record))")
    word = next((w for w in _PYTHON_WORDS if at.startswith(w)), None)
    if word:
        return f" (JSON writes {word} as {_PYTHON_WORDS[word]}; a Python dict written with str(): write json.dumps(record))"
    if at[:1].isalpha():
        return " (a text value takes double quotes)"
    return ""


def _parse_line(line: str, where: str, base: Path, format: str, allow_absolute_paths: bool,
                hints: dict | None = None) -> tuple[ParsedRecord, Path, tuple[float, float] | None]:
    try:
        obj = json.loads(line, object_pairs_hook=_object_without_repeated_keys)
    except _RepeatedKey as err:  # (json keeps the last silently: "label": "real", "label": "generated")
        raise DataError(where, f"the key {err.key!r} is given twice in one object", "json") from None
    except json.JSONDecodeError as err:
        # (json's "line 1 column 44" counts lines within the record: said as the place in this line)
        raise DataError(where, f"invalid JSON: {err.msg} at character {err.pos + 1} of the line"
                               f"{_json_hint(line, err)}", "json") from None
    except RecursionError:  # (Python's parser recurses per level: 100k nested '[' ended the load in a traceback)
        raise DataError(where, "invalid JSON: nested too deeply to be a record", "json") from None
    if hints is not None:
        for pair in misspelt_fields(obj):
            hints.setdefault(pair, []).append(where.rpartition(":")[2])  # (the line numbers)
    try:
        parsed = parse_record(obj, format)
    except RecordProblem as p:
        raise DataError(where, p.problem, p.kind) from None
    try:
        path = image_path_in_root(base, parsed.image, allow_absolute=allow_absolute_paths)
    except ValueError as err:
        raise DataError(where, str(err), "image_path") from None
    return parsed, path, _declared_size(obj)


def _declared_size(obj: dict) -> tuple[float, float] | None:
    """The record's own "width" and "height" (COCO-derived records carry them), where it gives both as numbers."""
    size = obj.get("width"), obj.get("height")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size):
        return size
    return None


Size = tuple[int, int] | Exception  # an image's displayed (width, height), or why it cannot be used


def _resolved(path: Path) -> Path:
    """`path` with its symbolic links followed; a missing file's path as far as it resolves. A link loop
    raises (RuntimeError, or OSError ELOOP: Python 3.13's non-strict resolve returns a loop's path as it is)."""
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        return path.resolve()


def _name_where_it_leads(path: Path) -> str:
    try:
        return _resolved(path).name
    except (OSError, RuntimeError):
        return path.name


def _open_image_file(path: Path, roots: Iterable[Path], max_image_pixels: int, check_decode: bool,
                     allow_absolute_paths: bool) -> tuple[Path, Size]:
    """Pass 2 for one image path as written under `roots` (the dataset roots of the records naming it): (where
    it resolves to, symbolic links followed; that file's displayed (width, height), or why it cannot be
    used). A file a link takes out of every root is not opened (unless allowed: `outside_root_problem`)."""
    try:
        resolved = _resolved(path)
    except (OSError, RuntimeError) as err:  # (a symbolic link loop)
        return path, ImageError(f"image path {path} cannot be resolved: {err}", "image_path")
    if not allow_absolute_paths and not any(resolved.is_relative_to(root) for root in roots):  # (said per record: _check_image)
        return resolved, ImageError(f"image path {path} leads out of the dataset root", "image_path")
    try:
        return resolved, image_size(resolved, max_image_pixels, check_decode)
    except (OSError, ValueError, SyntaxError, ImageError) as err:  # (FileNotFoundError is an OSError)
        return resolved, err


_PATH_MARK = "\x00"  # where a shared failure's message names its image (each process puts in its own path)


def _opened_as_json(path: Path, opened: tuple[Path, Size], templates: dict[tuple, int]) -> list | int | dict:
    """One image's `_open_image_file` for `ImageShare.exchange`: its [width, height], or the index of (what
    failed, the image's problem kind, the message with the path marked) in `templates`, which is filled as it
    goes (a wrong root, every image missing, sends one template and an index per image, not two million
    messages that each name their path through the coordination service); as {"at": where it resolves to,
    "is": that} where that is not `path` (a symbolic link)."""
    resolved, result = opened
    if resolved != path:
        return {"at": str(resolved), "is": _opened_as_json(resolved, (resolved, result), templates)}
    if not isinstance(result, Exception):
        return list(result)
    if isinstance(result, FileNotFoundError):
        key = ("missing", "image_missing", str(result).replace(str(path), _PATH_MARK))
    elif isinstance(result, ImageError):
        key = ("image", result.kind, str(result).replace(str(path), _PATH_MARK))
    else:  # (said as _check_image says it)
        key = ("image", "image_undecodable", f"image {_PATH_MARK} cannot be read: "
                                             + str(result).replace(str(path), _PATH_MARK))
    return templates.setdefault(key, len(templates))


def _opened_from_json(path: Path, value: list | int | dict, templates: Sequence[Sequence[str]]) -> tuple[Path, Size]:
    """`_opened_as_json`'s value back: (where the path resolves to, the size or the failure as the image's
    own process found it)."""
    if isinstance(value, dict):
        return _opened_from_json(Path(value["at"]), value["is"], templates)
    if isinstance(value, list):
        return path, (int(value[0]), int(value[1]))
    what, kind, message = templates[value]
    message = message.replace(_PATH_MARK, str(path))
    return path, FileNotFoundError(message) if what == "missing" else ImageError(message, kind)


def _open_shared(paths: Sequence[Path], open_file: Callable[[Path], tuple[Path, Size]],
                 share: ImageShare, pool: ThreadPoolExecutor | None) -> dict[Path, tuple[Path, Size]]:
    """Every image's `_open_image_file`, this process opening only its share of `paths` (every
    `share.count`-th from `share.index`) and the others' results exchanged (the same on every process)."""
    mine = paths[share.index::share.count]
    opened = list(pool.map(open_file, mine) if pool is not None else map(open_file, mine))
    templates: dict[tuple, int] = {}
    values = [_opened_as_json(path, result, templates) for path, result in zip(mine, opened)]
    sizes: dict[Path, tuple[Path, Size]] = {}
    for process, theirs in enumerate(share.exchange({"opened": values, "templates": list(templates)})):
        shared = paths[process::share.count]
        if len(theirs["opened"]) != len(shared):
            raise RuntimeError(f"process {process} opened {len(theirs['opened'])} images where this process "
                               f"assigned it {len(shared)}: the processes read different records")
        sizes.update((path, _opened_from_json(path, value, theirs["templates"]))
                     for path, value in zip(shared, theirs["opened"]))
    return sizes


def _check_image(pending: _Pending, opened: tuple[Path, Size], from_root: bool = False,
                 allow_absolute_paths: bool = False) -> Record | DataError:
    """Pass 2 for one record, given its image's `_open_image_file`: the path leads to a file inside the
    dataset root (unless allowed), the image opens within the limits and every box lies inside it."""
    where, parsed = pending.where, pending.parsed
    path, size = opened
    problem = outside_root_problem(parsed.image, path, pending.root, allow_absolute_paths)
    if problem:
        return DataError(where, problem, "image_path")
    if isinstance(size, FileNotFoundError):
        return DataError(where, f"missing image: {size}{missing_image_hint(pending.parsed.image, path, from_root)}",
                         "image_missing")
    if isinstance(size, ImageError):
        return DataError(where, str(size), size.kind)
    if isinstance(size, Exception):
        return DataError(where, f"image {path} cannot be read: {size}", "image_undecodable")
    width, height = size
    try:
        boxes = boxes_in_pixels(parsed, width, height)
    except RecordProblem as p:
        if p.kind == "box_outside":  # said again with the file's EXIF orientation (its header read only now)
            try:
                boxes_in_pixels(parsed, width, height, exif_orientation(path))
            except RecordProblem as rotated:
                p = rotated
        return DataError(where, p.problem, p.kind)
    return Record(index=-1, source=where, record_id=parsed.record_id, image=str(path), width=width,
                  height=height, label=parsed.label,
                  regions=tuple(Region(caption, box) for (caption, _), box in zip(parsed.regions, boxes)),
                  tags=parsed.tags, reasoning=parsed.reasoning, generator=parsed.generator, format=parsed.format,
                  system=parsed.system, user=parsed.user, assistant=parsed.assistant)


def _resized_hint(resized: Sequence[tuple[str, tuple[float, float], tuple[int, int]]], limit: int = 3) -> str:
    """Records whose own width/height are not their image's: boxes drawn on a resized copy (the size the
    record gives) would train in the wrong place while lying inside the image; the stored frame of an
    EXIF-rotated image (width and height swapped) is said as such."""
    shown = "; ".join(f"{where}: {w:g}x{h:g} given, the file {fw}x{fh} as displayed" + (
        " (its stored frame: EXIF-rotated)" if (w, h) == (fh, fw) else "")
        for where, (w, h), (fw, fh) in resized[:limit])
    return (f"{len(resized)} record(s) give a width and height other than their image's ({shown}"
            + (f"; and {len(resized) - limit} more" if len(resized) > limit else "")
            + "): boxes are read in the image file's pixels as displayed; if they were drawn on a copy of the "
              "size the record gives (or on a rotated image's stored frame), convert them")


LOGGED_PER_KIND = 20  # skipped records named in the log, per kind of problem (the summary counts every one)


def first_of_each_kind(errors: Sequence[DataError], limit: int | None) -> tuple[list[DataError], dict[str, int]]:
    """`errors` in their order, up to `limit` of each kind (None: all), and how many of each kind that leaves
    out: what a log or a terminal shows of thousands of invalid records (a wrong root makes every one)."""
    seen: Counter = Counter()
    shown = []
    for err in errors:
        seen[err.kind] += 1
        if limit is None or seen[err.kind] <= limit:
            shown.append(err)
    return shown, {kind: n - limit for kind, n in sorted(seen.items()) if limit is not None and n > limit}


def left_out_note(left: Mapping[str, int]) -> str:
    """"3 more (image_missing 2, label 1)" of `first_of_each_kind`'s counts."""
    return f"{sum(left.values())} more ({', '.join(f'{k} {n}' for k, n in left.items())})"


@dataclass(frozen=True)
class ImageShare:
    """Processes that split the opening of the images (each process reads every record): this one opens the
    images whose index, in the order the records first name them, is `index` modulo `count` (reads the
    header; decodes it whole with `check_decode`), and `exchange` (every process's value in process order, an
    allgather every process calls once per load) brings it the others' findings (each image's size, or why it
    cannot be used), so that every process keeps the same records without opening the others' images. A pod
    of 64 hosts then opens each image of a dataset on a network disk once, not 64 times."""

    index: int
    count: int
    exchange: Callable[[Any], list[Any]]


def load_warning(share: ImageShare | None, log: logging.Logger = logger) -> Callable[..., None]:
    """How a load's findings are said on `log`: what the load finds is the same on every process sharing the
    images, so the first says it (log.warning) and the others at debug level (a pod's 64 hosts printed each
    skipped record 64 times)."""
    return log.warning if share is None or share.index == 0 else log.debug


def load_records(files: str | Path | Sequence[str | Path], root: str | Path | None = None,
                 format: str = "auto", on_error: str = "raise", check_decode: bool = True,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, num_threads: int = 8,
                 allow_absolute_paths: bool = False, limit: int | None = None,
                 image_share: ImageShare | None = None) -> tuple[list[Record], LoadReport]:
    """Parse and validate JSONL ``files``; image paths are relative to ``root`` (default: each file's folder).

    ``format``: "native", "swift" or "auto" (per record: a "messages" key means ms-swift).
    ``allow_absolute_paths``: accept absolute image paths as they are, and symbolic links out of the root
    (only for a dataset you trust).
    ``limit``: the first ``limit`` valid records only: images are opened, in file order, until that many are
    valid (``fxjax eval --limit``: a look at 100 images of a 40k-record test set read every image first);
    the records after them are parsed but their images not opened (``report.unchecked``).
    ``image_share``: the processes of a run split the opening of the images (`ImageShare`; not with
    ``limit``).
    Returns the valid records (``index`` = position in this list) and a report of what was skipped.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format not in ("auto", "native", "swift"):
        raise ValueError(f"format must be 'auto', 'native' or 'swift', got {format!r}")
    if image_share is not None and limit is not None:
        raise ValueError("image_share splits the opening of every image: not with a limit")
    share = image_share if image_share is not None and image_share.count > 1 else None
    warn = load_warning(share)
    files = [files] if isinstance(files, (str, Path)) else list(files)
    report = LoadReport(files=[str(f) for f in files])
    errors: list[tuple[tuple[int, int], DataError]] = []  # ((file, line), error)

    # Pass 1: JSON and schema (cheap, in order). In raise mode, stop at the first problem.
    pending: list[_Pending] = []
    for file_index, file in enumerate(map(Path, files)):
        if not file.is_file():
            raise FileNotFoundError(f"dataset file {file} " + ("is a directory, not a JSONL file" if file.is_dir()
                                                               else "is not a regular file" if file.exists()
                                                               else "does not exist"))
        problem = whole_file_problem(file)
        if problem:
            raise DataError(str(file), problem, "json")
        base = (Path(root) if root is not None else file.parent).resolve()  # (once per file, not per record)
        records_in_file = 0
        hints: dict[tuple[str, str], list[str]] = {}
        for n, line in numbered_lines(file):
            if on_error == "raise" and errors:
                break
            if not line.strip():
                continue
            records_in_file += 1
            report.lines += 1
            where = f"{file}:{n}"
            try:
                parsed, path, declared = _parse_line(_decode(line, where), where, base, format, allow_absolute_paths,
                                                     hints)
            except DataError as err:
                errors.append(((file_index, n), err))
                continue
            pending.append(_Pending((file_index, n), where, parsed, path, declared, base))
        for (key, wanted), lines in sorted(hints.items()):
            at = ", ".join(lines[:5]) + (", ..." if len(lines) > 5 else "")
            which = f"{file}: {len(lines)} record(s) (line{'s' if len(lines) > 1 else ''} {at}) have a key {key!r}"
            report.hints.append(
                f"{which} and no 'regions': fxjax reads boxes from 'regions' only (each {{\"bbox\": [x1, y1, x2, y2], "
                f"\"caption\": ...}}); {key!r} is not read" if wanted == "regions" else
                f"{which} and no {wanted!r}: a misspelling? (fxjax reads {wanted!r}; other keys are kept for eval "
                f"--group-by)")
            warn("%s", report.hints[-1])
        # A file without one record is a wrong path or a broken export (unless we stopped reading early).
        if records_in_file == 0 and not (errors and on_error == "raise"):
            raise DataError(str(file), "has no records: the file is empty or holds only blank lines",
                            "empty_file")

    # Pass 2: images (I/O bound: threads), each file once however many records name it (several prompts or
    # annotations of one image: 40k records of 400 images took 20 s, not 0.3), then boxes against the size.
    roots: dict[Path, set[Path]] = {}  # each image path as written, in the order the records name them
    for item in pending:
        roots.setdefault(item.path, set()).add(item.root)

    def open_file(path: Path) -> tuple[Path, Size]:
        return _open_image_file(path, roots[path], max_image_pixels, check_decode, allow_absolute_paths)

    records: list[Record] = []
    resized: list[tuple[str, tuple[float, float], tuple[int, int]]] = []  # (where, the record's size, the file's)
    sizes: dict[Path, tuple[Path, Size]] = {}  # image path as written -> _open_image_file's
    done = 0  # pending records checked
    with ThreadPoolExecutor(max(num_threads, 1)) as pool:
        if share is not None:  # this process's share of the images, and what the others found in theirs
            sizes.update(_open_shared(list(roots), open_file, share, pool if num_threads > 1 else None))
        while done < len(pending) and (limit is None or len(records) < limit):
            # all at once without a limit; with one, about as many as are still wanted (and a few more)
            chunk = pending[done:] if limit is None else pending[done:done + max(2 * (limit - len(records)), 32)]
            paths = [path for path in dict.fromkeys(item.path for item in chunk) if path not in sizes]
            sizes.update(zip(paths, pool.map(open_file, paths) if num_threads > 1 else map(open_file, paths)))
            for item in chunk:
                if limit is not None and len(records) == limit:
                    break
                result = _check_image(item, sizes[item.path], root is not None, allow_absolute_paths)
                if isinstance(result, DataError):
                    errors.append((item.position, result))
                else:
                    records.append(result)
                    if item.declared is not None and tuple(item.declared) != (result.width, result.height):
                        resized.append((item.where, tuple(item.declared), (result.width, result.height)))
                done += 1
    if resized:
        report.hints.append(_resized_hint(resized))
        warn("%s", report.hints[-1])
    # the records a limit left unopened, by their files' names where the paths lead (as the loaded ones'):
    # a record fingerprint with a limit is the one without when every image is good
    names = []
    if done < len(pending):
        with ThreadPoolExecutor(max(num_threads, 1)) as pool:
            names = list(pool.map(lambda item: _name_where_it_leads(item.path), pending[done:]))
    report.unchecked = [(item.parsed.record_id, item.parsed.label, name) for item, name in zip(pending[done:], names)]
    errors.sort(key=lambda e: e[0])
    if errors and on_error == "raise":
        raise errors[0][1]
    report.skipped.extend(err for _, err in errors)
    named, unnamed = first_of_each_kind(report.skipped, LOGGED_PER_KIND)  # (each run's start named all 3,000)
    for err in named:
        warn("skipping record: %s", err)
    if unnamed:
        warn("skipping %s, not named here: `fxjax data check --show all` lists them",
                       left_out_note(unnamed))
    records = [dataclasses.replace(r, index=i) for i, r in enumerate(records)]
    report.loaded = len(records)
    if report.skipped:
        warn("%s", report.summary())
    return records, report
