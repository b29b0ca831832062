"""`fxjax docs [TOPIC]`: the documentation that help texts and messages cite (docs/*.md), printed.

The help of sft, grpo, eval and data check, and some errors, point at docs/data.md, docs/format.md or
docs/rewards.md. A `pip install` has no repository to open them in, so the wheel carries them (docs/
installs as fxjax/docs, as configs/ does as fxjax/configs) and this command prints them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "print the documentation that help texts cite (data formats, the output format, the rewards)"

# fxjax/docs where a wheel ships it, else the repository's docs/ (a checkout or an editable install), as
# fxjax.presets finds configs/.
_HERE = Path(__file__).resolve().parents[1]
DOCS_DIR = _HERE / "docs" if (_HERE / "docs").is_dir() else _HERE.parent / "docs"


README = "readme"  # the project's README.md: a checkout's, else the one the install's metadata carries


def topics() -> dict[str, Path]:
    """name -> file: every docs/*.md ("data" for docs/data.md), and README."""
    found = {p.stem: p for p in sorted(DOCS_DIR.glob("*.md"))}
    if found or (_HERE.parent / "README.md").is_file():
        found[README] = _HERE.parent / "README.md"
    return found


def text_of(path: Path) -> str:
    """A document's text; README from the installed package's metadata when no checkout holds it (a wheel)."""
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from importlib.metadata import metadata

    return metadata("fxjax").get_payload() or ""


def title(path: Path) -> str:
    """The document's first heading, without its '#'."""
    for line in text_of(path).splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def section(text: str, wanted: str, name: str) -> str:
    """The part of `text` from the first heading that contains `wanted` (any case) to the next heading of
    its level or above; ValueError listing the headings when none does."""
    lines = text.splitlines(keepends=True)
    heads, fenced = [], False  # (a '#' line inside a ``` block is code, not a heading)
    for i, line in enumerate(lines):
        fenced ^= line.lstrip().startswith("```")
        if line.startswith("#") and not fenced:
            heads.append((i, len(line) - len(line.lstrip("#"))))
    start = next(((i, level) for i, level in heads if wanted.lower() in lines[i].lower()), None)
    if start is None:
        listed = "; ".join(lines[i].strip("# \n") for i, _ in heads)
        raise ValueError(f"--section {wanted!r}: no heading of {name} contains it; its headings: {listed}")
    end = next((i for i, level in heads if i > start[0] and level <= start[1]), len(lines))
    return "".join(lines[start[0]:end])


def add_parser(sub) -> None:
    p = sub.add_parser("docs", help=HELP, description=(
        "Print one of fxjax's documents (Markdown) to stdout, or list them. Help texts and error messages\n"
        "cite them as docs/NAME.md: `fxjax docs NAME` prints that file from this install, so they are at\n"
        "hand after `pip install` too; `fxjax docs readme` prints the README."),
        epilog="examples:\n  fxjax docs              # the list\n  fxjax docs data         # docs/data.md: "
               "the dataset records\n  fxjax docs format | less\n  fxjax docs readme --section 'from TRL'   # a README section",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topic", metavar="TOPIC", nargs="?", default=None,
                   help="a document's name (data, format, rewards, readme, ...; docs/NAME.md also works); none: "
                        "the list")
    p.add_argument("--section", metavar="TEXT",
                   help="print only the section whose heading contains TEXT (any case), e.g. `fxjax docs readme "
                        "--section GRPO`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    found = topics()
    if not found:
        raise FileNotFoundError(f"no documents in {DOCS_DIR}: this install of fxjax lacks its docs/ folder")
    if args.topic is None:
        width = max(map(len, found))
        print("\n".join(f"{name:{width}s}  {title(path)}" for name, path in found.items()))
        print("\n`fxjax docs NAME` prints one.")
        return 0
    name = Path(args.topic).name.removesuffix(".md")
    name = README if name.lower() == README else name
    if name not in found:
        raise ValueError(f"no document named {args.topic!r}; there are: {', '.join(found)}")
    text = text_of(found[name])
    sys.stdout.write(section(text, args.section, args.topic) if args.section else text)
    return 0
