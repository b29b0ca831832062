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


def topics() -> dict[str, Path]:
    """name -> file: every docs/*.md ("data" for docs/data.md)."""
    return {p.stem: p for p in sorted(DOCS_DIR.glob("*.md"))}


def title(path: Path) -> str:
    """The document's first heading, without its '#'."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def add_parser(sub) -> None:
    p = sub.add_parser("docs", help=HELP, description=(
        "Print one of fxjax's documents (Markdown) to stdout, or list them. Help texts and error messages "
        "cite them as docs/NAME.md: `fxjax docs NAME` prints that file from this install, so they are at "
        "hand after `pip install` too."),
        epilog="examples:\n  fxjax docs              # the list\n  fxjax docs data         # docs/data.md: "
               "the dataset records\n  fxjax docs format | less",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topic", metavar="TOPIC", nargs="?", default=None,
                   help="a document's name (data, format, rewards, ...; docs/NAME.md also works); none: the list")
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
    if name not in found:
        raise ValueError(f"no document named {args.topic!r}; there are: {', '.join(found)}")
    sys.stdout.write(found[name].read_text(encoding="utf-8"))
    return 0
