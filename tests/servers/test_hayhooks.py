"""
examples/hayhooks/ served for real: `hayhooks run` on 127.0.0.1 over the session's PostgreSQL + pgvector server.

Two servers, as a user would start them (examples/hayhooks/README.md):
- the PipelineWrapper route (pipelines/expandr_search/), with HAYSTACK_DESERIALIZATION_ALLOWLIST unset and no .env:
  the wrapper's own import of expandr_haystack must be what lets the YAML load;
- the YAML-only route: a server with no pipelines, started in a folder holding examples/hayhooks/.env, then
  `POST /deploy-yaml` of the same YAML (what `hayhooks pipeline deploy-yaml` sends).
Both must return the documents (ids, order, scores) and expansion the in-process Haystack pipeline returns for the
same query: same YAML, same seed. Each server is a fresh process that finds the index this process wrote in
PostgreSQL. A server that cannot start fails the test, with the end of its log.
"""

from __future__ import annotations

import functools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest
from haystack import Pipeline

from tests.servers.conftest import EXAMPLES, load_example

pytestmark = pytest.mark.integration

HAYHOOKS = EXAMPLES / "hayhooks"
PIPELINES = HAYHOOKS / "pipelines"
YAML = PIPELINES / "expandr_search" / "expandr_search.yml"
ALLOWLIST_ENV = "HAYSTACK_DESERIALIZATION_ALLOWLIST"
#: What would let our YAML load without the wrapper or the .env: unset for the servers that must do without it.
UNSAFE_ENV = "HAYSTACK_UNSAFE_DESERIALIZATION"
N_DOCS = 200
#: The wrapper server's expansion length (EXPANDR_MAX_NEW_TOKENS): short, generation runs ~30 tokens/s here.
TOKENS = 8
#: The YAML's own max_new_tokens (the YAML route takes no override).
YAML_TOKENS = 64
QUERIES = [
    "what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft .",
    "what are the structural and aeroelastic problems associated with flight of high speed aircraft .",
    "how can the effect of the boundary-layer on wing pressure be calculated .",
]


@pytest.fixture(scope="module")
def launcher():
    return load_example("hayhooks/launcher.py", "expandr_example_hayhooks_launcher")


@pytest.fixture(scope="module")
def dsn(postgres):
    """A database of its own on the session server (other tests may use the same table name in `postgres`)."""
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS expandr_hayhooks")
        conn.execute("CREATE DATABASE expandr_hayhooks")
    return postgres.dsn.rsplit("/", 1)[0] + "/expandr_hayhooks"


@pytest.fixture(scope="module")
def pg_env(dsn):
    """PG_CONN_STR set in this process (the indexer and the in-process pipeline read it) for the module."""
    before = os.environ.get("PG_CONN_STR")
    os.environ["PG_CONN_STR"] = dsn
    yield dsn
    if before is None:
        os.environ.pop("PG_CONN_STR", None)
    else:
        os.environ["PG_CONN_STR"] = before


@pytest.fixture(scope="module")
def indexed(pg_env):
    """The first N_DOCS Cranfield documents in the pipeline's table, written by examples/hayhooks/index.py."""
    index = load_example("hayhooks/index.py", "expandr_example_hayhooks_index")
    assert index.index(N_DOCS) == {"wanted": N_DOCS, "written": N_DOCS, "in_table": N_DOCS}
    assert index.index(N_DOCS)["written"] == 0  # idempotent: a second run writes nothing
    return pg_env


@pytest.fixture(scope="module")
def servers(launcher, pg_env, request, tmp_path_factory):
    """Both servers, started together while this process indexes the table:
    - "wrapper": the PipelineWrapper route (examples/hayhooks/pipelines), the allow-list variable unset, no .env;
    - "yaml": no pipelines yet, started in a folder holding a copy of examples/hayhooks/.env, the variable unset.
    Stopped at the end of the module, whatever happened (SIGINT, then SIGKILL)."""
    wrapper_dir, yaml_dir = tmp_path_factory.mktemp("wrapper-server"), tmp_path_factory.mktemp("yaml-server")
    shutil.copy(HAYHOOKS / ".env", yaml_dir / ".env")
    (yaml_dir / "pipelines").mkdir()
    started = {}
    try:
        started["wrapper"] = launcher.spawn(
            PIPELINES, cwd=wrapper_dir, log=wrapper_dir / "hayhooks.log", drop_env=(ALLOWLIST_ENV, UNSAFE_ENV),
            env={"PG_CONN_STR": pg_env, "EXPANDR_CACHE_DIR": str(wrapper_dir / "cache"),
                 "EXPANDR_MAX_NEW_TOKENS": str(TOKENS)})
        started["yaml"] = launcher.spawn(
            yaml_dir / "pipelines", cwd=yaml_dir, log=yaml_dir / "hayhooks.log", env={"PG_CONN_STR": pg_env},
            drop_env=(ALLOWLIST_ENV, UNSAFE_ENV, "EXPANDR_CACHE_DIR", "EXPANDR_MAX_NEW_TOKENS"))
        request.getfixturevalue("indexed")
        started["wrapper"].wait_for("expandr_search", timeout=120)
        started["yaml"].wait_ready(timeout=120)
        yield started
    finally:
        for name, server in started.items():
            print(f"{name} server stopped with {server.stop()}; log tail:\n{server.log_tail(1500)}")


@pytest.fixture(scope="module")
def wrapper_server(servers):
    return servers["wrapper"]


@pytest.fixture(scope="module")
def local(indexed):
    """The in-process answers: the YAML loaded with Haystack's loader (no cache); `local(query, max_new_tokens)` is
    the (expansions, [(id, score), ...]) of its run, each computed once."""
    import expandr_haystack  # noqa: F401 - allow-lists our module

    pipeline = Pipeline.loads(YAML.read_text())
    expander = pipeline.get_component("expander")
    expander.cache = None
    default = expander.generation
    assert default.max_new_tokens == YAML_TOKENS, "the YAML's expansion length changed: update YAML_TOKENS"

    @functools.cache
    def answer(query: str, max_new_tokens: int) -> tuple[list[str], list[tuple[str, float]]]:
        expander.generation = default.replace(max_new_tokens=max_new_tokens)
        result = pipeline.run({"expander": {"query": query}}, include_outputs_from={"expander"})
        return result["expander"]["expansions"], [(d.id, d.score) for d in result["retriever"]["documents"]]

    yield answer
    pipeline.close()


def search(server, query, route="expandr_search", **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/{route}/run", json={"query": query, **extra}, timeout=60)


def assert_same_hits(got: list[dict], want: list[tuple[str, float]]) -> None:
    assert [d["id"] for d in got] == [i for i, _ in want]
    assert [d["score"] for d in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_wrapper_route_answers_like_the_in_process_pipeline(wrapper_server, local):
    for query in QUERIES:
        expansions, hits = local(query, TOKENS)
        response = search(wrapper_server, query)
        assert response.status_code == 200, response.text
        result = response.json()["result"]
        assert result["query"] == query
        assert result["expansions"] == expansions and len(expansions) == 1 and expansions[0].strip()
        assert result["failures"] == []
        assert_same_hits(result["documents"], hits)
        first = result["documents"][0]
        assert first["content"] and first["meta"]["title"]

    assert (wrapper_server.log.parent / "cache" / "expansions.sqlite").exists()  # EXPANDR_CACHE_DIR

    # top_k and filters reach the retriever
    top2 = search(wrapper_server, QUERIES[0], top_k=2).json()["result"]["documents"]
    assert [d["id"] for d in top2] == [i for i, _ in local(QUERIES[0], TOKENS)[1][:2]]
    title = top2[1]["meta"]["title"]
    only = search(wrapper_server, QUERIES[0], filters={"field": "meta.title", "operator": "==", "value": title})
    assert only.status_code == 200, only.text
    assert [d["meta"]["title"] for d in only.json()["result"]["documents"]] == [title]


@pytest.mark.parametrize(("body", "message"), [
    ({"query": ""}, "`query` must be a non-empty string"),
    ({"query": "  \n "}, "`query` must be a non-empty string"),
    ({"query": QUERIES[0], "top_k": 0}, "`top_k` must be between 1 and 100; got 0."),
    ({"query": QUERIES[0], "filters": {"field": "meta.title", "operator": "~", "value": "x"}},
     "`filters`: Unknown comparison operator '~'"),
])
def test_a_bad_request_is_a_422_with_the_reason_and_the_server_stays_up(wrapper_server, body, message):
    response = httpx.post(f"{wrapper_server.url}/expandr_search/run", json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]
    assert wrapper_server.process.poll() is None
    again = search(wrapper_server, QUERIES[1])
    assert again.status_code == 200 and again.json()["result"]["documents"]


def test_concurrent_clients_get_their_own_answers(wrapper_server, local):
    """4 clients at once: 4 queries the server has not seen (4 generations in parallel threads) and the 3 cached ones
    twice; every answer is its own query's, as the in-process pipeline computes it alone."""
    from expandr_haystack.evaluation.data import bundled_path, load_collection

    fresh = [q for q in load_collection(bundled_path("cranfield"), "test").queries.values() if q not in QUERIES][:4]
    asked = fresh + QUERIES + QUERIES
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda q: search(wrapper_server, q), asked))
    assert [r.status_code for r in responses] == [200] * len(asked), [r.text for r in responses]
    for query, response in zip(asked, responses):
        result = response.json()["result"]
        expansions, hits = local(query, TOKENS)
        assert (result["query"], result["expansions"]) == (query, expansions)
        assert_same_hits(result["documents"], hits)


def test_yaml_route_with_the_examples_env_file(servers, local):
    """The server with no pipelines, started in a folder holding examples/hayhooks/.env (the variable unset in its
    environment): `POST /deploy-yaml` of the YAML deploys, and its route answers like the in-process pipeline at the
    YAML's own settings (64 new tokens, cache in the working directory)."""
    server = servers["yaml"]
    folder = server.log.parent
    deployed = httpx.post(f"{server.url}/deploy-yaml", timeout=120, json={
        "name": "expandr_search_yaml", "source_code": YAML.read_text(), "save_file": True})
    assert deployed.status_code == 200, f"{deployed.text}\n{server.log_tail()}"
    server.wait_for("expandr_search_yaml")
    assert (folder / "pipelines" / "expandr_search_yaml.yml").exists()  # redeployed by the next start

    expansions, hits = local(QUERIES[0], YAML_TOKENS)
    response = search(server, QUERIES[0], route="expandr_search_yaml")
    assert response.status_code == 200, f"{response.text}\n{server.log_tail()}"
    result = response.json()["result"]  # the YAML route returns the outputs of each component named in outputs:
    assert result["expander"]["expansions"] == expansions
    assert_same_hits(result["retriever"]["documents"], hits)
    assert (folder / "expandr_cache" / "expansions.sqlite").exists()

    # Hayhooks' YAML route answers every pipeline error with 500; our message is in it (the wrapper: a 422)
    empty = search(server, "", route="expandr_search_yaml")
    assert empty.status_code == 500
    assert "`query` must be a non-empty string" in empty.json()["detail"]
    assert search(server, QUERIES[0], route="expandr_search_yaml").status_code == 200  # still up (a cache hit)
