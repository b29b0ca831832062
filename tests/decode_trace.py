"""`python tests/decode_trace.py ARGS` = `python -m fxjax.cli ARGS`, with every example the data pipeline
builds (decodes and tokenises) appended to ``$FXJAX_TEST_DECODE_LOG-<process id>.txt`` as
``<epoch> <record source>`` lines: the 2-process SFT test checks which records each process decoded; and
each image the records' check opens to ``...-checked-<process id>.txt``, as ``decoded <path>`` (decoded whole:
data.check_decode) or ``header <path>``."""

from __future__ import annotations

import os
import sys

from fxjax.data import records
from fxjax.data.examples import ExampleBuilder

_build = ExampleBuilder.build
_image_size = records.image_size
_PROCESS = os.environ.get("FXJAX_PROCESS_ID", "0")
_LOG = f"{os.environ['FXJAX_TEST_DECODE_LOG']}-{_PROCESS}.txt"
_CHECKED = f"{os.environ['FXJAX_TEST_DECODE_LOG']}-checked-{_PROCESS}.txt"


def _traced_build(self, record, epoch: int = 0):
    with open(_LOG, "a") as log:
        log.write(f"{epoch} {record.source}\n")
    return _build(self, record, epoch)


def _traced_image_size(path, max_image_pixels, decode=True):
    with open(_CHECKED, "a") as log:
        log.write(f"{'decoded' if decode else 'header'} {path}\n")
    return _image_size(path, max_image_pixels, decode)


if __name__ == "__main__":
    ExampleBuilder.build = _traced_build
    records.image_size = _traced_image_size
    from fxjax.cli import main

    sys.exit(main(sys.argv[1:]))
