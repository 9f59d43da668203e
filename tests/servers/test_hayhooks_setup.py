"""
examples/hayhooks/ without a server: the allow-list refusal the .env is for, and the wrapper's settings. Fast (no
model, no server), so `make test-min` runs them too; the served routes are tested in test_hayhooks.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.servers.conftest import EXAMPLES, load_example

YAML = EXAMPLES / "hayhooks" / "pipelines" / "expandr_search" / "expandr_search.yml"
ALLOWLIST_ENV = "HAYSTACK_DESERIALIZATION_ALLOWLIST"
UNSAFE_ENV = "HAYSTACK_UNSAFE_DESERIALIZATION"


def test_yaml_alone_is_refused_without_the_allowlist(tmp_path):
    """What the .env is for: a fresh Haystack process (no import of our package, no setting) refuses the YAML."""
    env = {k: v for k, v in os.environ.items() if k not in (ALLOWLIST_ENV, UNSAFE_ENV)}
    code = f"from haystack import Pipeline; Pipeline.loads(open({str(YAML)!r}).read())"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode != 0
    assert "Refusing to deserialize a class from module 'expandr_haystack.components.expander'" in done.stderr


def test_the_wrapper_names_a_missing_or_bad_setting(monkeypatch):
    wrapper = load_example("hayhooks/pipelines/expandr_search/pipeline_wrapper.py", "expandr_example_hayhooks_wrapper")
    monkeypatch.delenv("PG_CONN_STR", raising=False)
    with pytest.raises(RuntimeError, match="PG_CONN_STR is not set"):
        wrapper.load_pipeline()
    monkeypatch.setenv("PG_CONN_STR", "postgresql://postgres@127.0.0.1:1/none")  # not connected before warm_up
    monkeypatch.setenv("EXPANDR_CACHE_DIR", "/srv/expandr")
    monkeypatch.setenv("EXPANDR_MAX_NEW_TOKENS", "24")
    expander = wrapper.load_pipeline().get_component("expander")
    assert (expander.cache, expander.generation.max_new_tokens) == ("/srv/expandr/expansions.sqlite", 24)
    for bad in ("0", "many"):
        monkeypatch.setenv("EXPANDR_MAX_NEW_TOKENS", bad)
        with pytest.raises(ValueError, match=f"EXPANDR_MAX_NEW_TOKENS must be a whole number of tokens >= 1; got "
                                             f"'{bad}'"):
            wrapper.load_pipeline()
