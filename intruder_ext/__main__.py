"""`python -m intruder_ext` and the `intruder-ext` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
