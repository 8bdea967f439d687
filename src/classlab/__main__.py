"""``python -m classlab``: the same as the ``classlab`` command."""

import sys

from classlab.cli import main

sys.exit(main())
