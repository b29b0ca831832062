"""`python -m fxjax ARGS` = the `fxjax` command (for environments whose scripts folder is not on PATH)."""

import sys

from fxjax.cli import main

sys.exit(main())
