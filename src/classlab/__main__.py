"""``python -m classlab``: the same command line as ``classlab``."""

import sys

from classlab.cli import main

sys.exit(main())
