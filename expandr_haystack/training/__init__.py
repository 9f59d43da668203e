"""Training: DPO pair construction for the expander (`pairs`) and one DPO + LoRA round (`dpo`)."""

from expandr_haystack.training.dpo import DPOSettings, train_dpo
from expandr_haystack.training.pairs import PairConfig, PairStats, build_pairs, make_components

__all__ = ["DPOSettings", "PairConfig", "PairStats", "build_pairs", "make_components", "train_dpo"]
