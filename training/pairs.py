"""
Build ExpandR DPO preference pairs for the expander (TRL conversational format, JSONL).

    python training/pairs.py --data cranfield --split train --out pairs.jsonl [--n-candidates 8] [--no-answer] ...

The same as `expandr pairs ...` (expandr_haystack/training/cli.py; `--help` lists the options); the library code is
expandr_haystack.training.pairs (`build_pairs`), which the joint-training loop calls.
"""

import sys

from expandr_haystack.cli import main

if __name__ == "__main__":
    sys.exit(main(["pairs", *sys.argv[1:]]))
