"""
Evaluation on BEIR-layout collections: data loading (`data`), indexing (`indexing`), pytrec_eval metrics (`metrics`),
the evaluation loop (`evaluate`) and its presentation (`report`: tables and plots).
"""

from expandr_haystack.evaluation.report import format_table, plot_metrics
from expandr_haystack.evaluation.runner import DEFAULT_METHODS, METHODS, EvalResult, evaluate, parse_methods

__all__ = ["DEFAULT_METHODS", "METHODS", "EvalResult", "evaluate", "format_table", "parse_methods", "plot_metrics"]
