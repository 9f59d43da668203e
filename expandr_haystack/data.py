"""Kept for imports written before 0.2: the module now lives in `expandr_haystack.evaluation.data`."""

from expandr_haystack.evaluation.data import *
from expandr_haystack.evaluation.data import __all__  # noqa: F401
