"""
ExpandR joint training: k alternating rounds of retriever contrastive training and LLM DPO.

    python training/joint.py --config training/configs/tiny-cpu.yaml [--output runs/tiny-cpu] [--resume] [--rounds K]

Same as `expandr train ...`. The logic lives in expandr_haystack.training (config, retriever, pairs, dpo, rounds).
"""

import os
import sys

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from expandr_haystack.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
