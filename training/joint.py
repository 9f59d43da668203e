"""
ExpandR joint training: k alternating rounds of retriever contrastive training and LLM DPO.

    python training/joint.py --config training/configs/tiny-cpu.yaml [--output runs/tiny-cpu] [--resume] [--rounds K]

The same as `expandr train ...` (expandr_haystack/training/cli.py); the logic lives in expandr_haystack.training.
"""

import sys

from expandr_haystack.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
