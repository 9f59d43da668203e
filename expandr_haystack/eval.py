"""
`python -m expandr_haystack.eval DATA_DIR [options]`: the same as `expandr eval DATA_DIR [options]`.

See `expandr_haystack.cli` for the options.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from expandr_haystack.cli import main as _cli_main


def main(argv: Sequence[str] | None = None) -> int:
    """Run `expandr eval` with `argv` (None = `sys.argv[1:]`); returns the exit status."""
    return _cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
