"""
Training: every setting (`config`; its rules and YAML conversion: `config_checks`; what differs between transformers
releases: `compat`), DPO pair construction for the expander (`pairs`), one DPO + LoRA round (`dpo`), the retriever step
(`retriever`, `losses`), the run folder (`runfiles`), the joint-training rounds (`rounds`), their evaluation and report
(`round_eval`) and each round's saved search pipeline (`round_pipeline`).

Usage:
```python
from expandr_haystack.training import JointConfig, JointTrainer

JointTrainer(JointConfig.from_yaml("training/configs/tiny-cpu.yaml"), "runs/tiny-cpu").run(resume=True)
```
"""

from expandr_haystack.training.config import (
    ConfigError,
    DPOSettings,
    ExpansionSettings,
    JointConfig,
    PairConfig,
    RetrieverSettings,
)
from expandr_haystack.training.dpo import train_dpo
from expandr_haystack.training.pairs import PairStats, build_pairs, make_components
from expandr_haystack.training.round_pipeline import load_round_pipeline
from expandr_haystack.training.rounds import JointTrainer
from expandr_haystack.training.runfiles import RunFolder, RunFolderError

__all__ = ["ConfigError", "DPOSettings", "ExpansionSettings", "JointConfig", "JointTrainer", "PairConfig", "PairStats",
           "RetrieverSettings", "RunFolder", "RunFolderError", "build_pairs", "load_round_pipeline", "make_components",
           "train_dpo"]
