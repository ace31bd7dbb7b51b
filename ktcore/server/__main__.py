"""``python -m ktcore.server MODEL ...``: same as ``kt serve MODEL ...``."""

import sys

from ktcore.cli.serve import main

raise SystemExit(main(["serve", *sys.argv[1:]]))
