"""`python tests/decode_trace.py ARGS` = `python -m fxjax.cli ARGS`, with every example the data pipeline
builds (decodes and tokenises) appended to ``$FXJAX_TEST_DECODE_LOG-<process id>.txt`` as
``<epoch> <record source>`` lines: the 2-process SFT test checks which records each process decoded."""

from __future__ import annotations

import os
import sys

from fxjax.data.examples import ExampleBuilder

_build = ExampleBuilder.build
_LOG = f"{os.environ['FXJAX_TEST_DECODE_LOG']}-{os.environ.get('FXJAX_PROCESS_ID', '0')}.txt"


def _traced_build(self, record, epoch: int = 0):
    with open(_LOG, "a") as log:
        log.write(f"{epoch} {record.source}\n")
    return _build(self, record, epoch)


if __name__ == "__main__":
    ExampleBuilder.build = _traced_build
    from fxjax.cli import main

    sys.exit(main(sys.argv[1:]))
