"""Kept for imports written before 0.2: the module now lives in `expandr_haystack.evaluation.indexing`."""

from expandr_haystack.evaluation.indexing import *
from expandr_haystack.evaluation.indexing import __all__  # noqa: F401
