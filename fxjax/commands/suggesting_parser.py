"""The command line's parser: argparse's, with the nearest name said after a misspelt command or flag.

`fxjax stf` got argparse's "invalid choice: 'stf' (choose from 'selfcheck', 'init', ...)" and `fxjax eval
... --stp 3` "unrecognized arguments"; a config key misspelt in --set or a file already gets "did you mean".
"""

from __future__ import annotations

import argparse
import difflib
import re

__all__ = ["SuggestingParser", "nearest_name"]


def nearest_name(parser: argparse.ArgumentParser, message: str) -> str:
    """" (did you mean NAME?)" for an argparse error about a misspelt choice or --flag, "" otherwise."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        given, names = choice.group(1), re.findall(r"'([^']*)'", choice.group(2))
    else:
        flag = re.match(r"unrecognized arguments: (--[^\s=]+)", message)
        if flag is None:
            return ""
        given = flag.group(1)
        names = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
    bare = {name.lstrip("-"): name for name in names}  # (the shared "--" made every flag look alike)
    close = difflib.get_close_matches(given.lstrip("-"), list(bare), n=1, cutoff=0.6)
    return f" (did you mean {bare[close[0]]}?)" if close else ""


class SuggestingParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors name the nearest command or flag (its sub-parsers too: argparse
    makes them of the parent's class)."""

    def error(self, message: str):
        super().error(message + nearest_name(self, message))
