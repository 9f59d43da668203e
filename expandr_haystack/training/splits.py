"""
The collections a joint-training run reads: its training queries, the validation queries carved out of the train
split, and the evaluation split, sharing one corpus (cut to `max_corpus_documents` plus every judged document).

Usage:
```python
from expandr_haystack.training.config import JointConfig
from expandr_haystack.training.splits import run_collections

train, validation, evaluation = run_collections(JointConfig.from_yaml("training/configs/micro.yaml"))
```
"""

from __future__ import annotations

from expandr_haystack.evaluation.data import Collection, load_collection
from expandr_haystack.training.config import ConfigError, JointConfig


def run_collections(config: JointConfig) -> tuple[Collection, Collection | None, Collection]:
    """
    ``(train, validation, eval)`` of `config`: validation (None without `validation_queries`) is carved from the
    whole train split with the run's seed, `max_train_queries` then limits the rest, `max_eval_queries` the eval
    split; with `max_corpus_documents` the three share the judged documents of their queries + the first N others.
    """
    c = config
    validation = None
    if c.validation_size is None:
        train = load_collection(c.data, c.train_split, c.max_train_queries)
    else:
        try:
            rest, validation = load_collection(c.data, c.train_split).split_validation(c.validation_size, seed=c.seed)
        except ValueError as exc:
            raise ConfigError(f"`validation_queries`: {exc}") from None
        ids = list(rest.queries)[: c.max_train_queries] if c.max_train_queries else list(rest.queries)
        train = rest.subset(ids)
    evaluation = load_collection(c.data, c.eval_split, c.max_eval_queries)
    if c.max_corpus_documents is not None:
        splits = [s for s in (train, evaluation, validation) if s is not None]
        keep = {d for col in splits for judged in col.qrels.values() for d in judged}
        keep.update(list(train.corpus)[: c.max_corpus_documents])
        corpus = {d: v for d, v in train.corpus.items() if d in keep}
        for col in splits:
            col.corpus = corpus
    return train, validation, evaluation


__all__ = ["run_collections"]
