"""Why the image a record names is not there, where a file close to it is (`missing_image_hint`): the hint
that follows a record's `image_missing` error."""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = ["missing_image_hint"]


def missing_image_hint(rel: str, path: Path, from_root: bool = False) -> str:
    """Why the image a record names as `rel` (resolved to `path`) is not there, where a file close to it is: a
    path with white space at an end, a Windows path ("images\\a.png" is one name with a backslash in it
    here), accents composed otherwise, another case. The path is not rewritten silently: the record is."""
    if rel != rel.strip():  # (printed plainly, a trailing space cannot be seen)
        return (f" (the path {rel!r} starts or ends with white space"
                + (f"; {rel.strip()!r} exists" if str(path).endswith(rel)
                   and Path(str(path)[:-len(rel)] + rel.strip()).is_file() else "")
                + ")")
    if "\\" not in rel:
        return _normalisation_hint(path) or _case_hint(path) or _working_folder_hint(rel, path, from_root)
    posix = rel.replace("\\", "/")
    if not Path(str(path).replace("\\", "/")).is_file():
        return " (the path has backslashes: write paths in the records with '/')"
    return f" (the path has backslashes; {posix!r} exists: write paths in the records with '/')"


def _working_folder_hint(rel: str, path: Path, from_root: bool) -> str:
    """A relative path written from the working folder rather than from where the paths are read (the records'
    file's folder, or data.root where `from_root`): said with the setting that reads them from there."""
    here = Path(rel)
    if here.is_absolute() or not here.is_file() or here.resolve() == path.resolve():
        return ""
    read_from = "data.root (--root)" if from_root else "the folder of the records' file"
    return (f" (image paths are read relative to {read_from}, not the working folder, where {rel} is: set "
            f"data.root, or --root for fxjax data check and eval, to {Path.cwd()})")


def _normalisation_hint(path: Path) -> str:
    """A name whose accented letters are composed otherwise than the file's (macOS writes "é" as "e" and a
    combining accent, NFD; most editors NFC): printed, the two look the same. Say which file it is."""
    import unicodedata

    name = path.name
    if name.isascii() or not path.parent.is_dir():
        return ""
    for form in ("NFC", "NFD"):
        other = unicodedata.normalize(form, name)
        if other != name and (path.parent / other).is_file():
            return (f" (a file of this name with its accents composed otherwise ({form}) exists: {ascii(other)}, "
                    f"not {ascii(name)}; write the record's path as the file system has it)")  # (ascii: printed
            # plainly, the two spellings look the same)
    return ""


def _case_hint(path: Path) -> str:
    """A name that differs from an existing file's in case only (a dataset made on macOS or Windows, whose file
    systems ignore case): say which file it is."""
    try:
        stat = path.parent.stat()
    except OSError:
        return ""
    same = _names_by_lower_case(str(path.parent), stat.st_mtime_ns).get(path.name.lower())
    return f" ({same!r} exists: file names are case-sensitive here)" if same else ""


@functools.lru_cache(maxsize=8)
def _names_by_lower_case(folder: str, mtime_ns: int) -> dict[str, str]:
    """A folder's file names by their lower-case form, listed once per folder and version (its mtime): a
    dataset of 100k records all named in the wrong case lists its folder once, not once per record."""
    try:
        return {p.name.lower(): p.name for p in Path(folder).iterdir()}
    except OSError:
        return {}
