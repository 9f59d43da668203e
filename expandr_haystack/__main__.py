"""`python -m expandr_haystack eval | pairs | train ...`: the `expandr` command line."""

import sys

from expandr_haystack.cli import main

if __name__ == "__main__":
    sys.exit(main())
