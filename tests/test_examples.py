"""`make run` (examples/search.py) end to end, small: every line it promises is printed."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.integration
def test_make_run_prints_dense_prf_both_expandr_modes_and_haystack_multiquery(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("search_example", ROOT / "examples" / "search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--max-queries", "4", "--validation-size", "3", "--n-expansions", "1", "--max-new-tokens", "8",
                 "--cache", str(tmp_path / "c.sqlite"), "--show", "1"])
    out = capsys.readouterr().out
    assert "chosen on validation: w(q2d)" in out
    labels = [r"dense, no expansion", r"PRF \(Rocchio k=\d+\), no LLM", r"ExpandR q2d \(n=1, w=[\d.]+\)",
              r"ExpandR grounded \(n=1, w=[\d.]+\)", r"Haystack multi-query \(n=1, JSON prefill\)"]
    for label in labels:
        assert re.search(label + r"\s+nDCG@10\s+\d+\.\d\d", out), (label, out)
    assert "grounded expansion:" in out and "q2d expansion:" in out and "multiquery queries:" in out
    assert re.search(r"Haystack multi-query: QueryExpander read the LLM's JSON in \d+ of 4 replies", out), out
