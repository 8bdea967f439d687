"""``python -m classlab``: the same as the ``classlab`` command."""

import sys

from classlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
