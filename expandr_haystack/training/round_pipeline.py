"""
The saved pipeline of a joint-training round: `round_pipeline_yaml` writes a ready YAML search pipeline for one round's
encoder and LLM (``round_<r>/pipeline.yaml``), with the model, adapter and cache paths inside the run folder written
relative to it (`relative_pipeline_paths`); `load_round_pipeline` reads it back from wherever the run folder now lives
(`resolve_pipeline_paths`).

Usage:
```python
from expandr_haystack.training import load_round_pipeline

pipeline = load_round_pipeline("runs/tiny-cpu/round_2/pipeline.yaml")
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The init parameters that hold model, adapter or cache paths, rewritten relative to the run folder in a round's
#: ``pipeline.yaml`` (at any depth: nested query embedders and retrievers too).
PATH_KEYS = ("model", "adapter", "cache")
#: The pipeline ``metadata`` key of a round's ``pipeline.yaml``: the folder its ``./`` paths are relative to, itself
#: relative to the YAML file's folder (".." = the run folder, the parent of ``round_<r>/``).
PATHS_BASE_KEY = "expandr_paths_relative_to"


def _is_relative_marker(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("./", "../"))


def _rewrite_paths(node: Any, rewrite) -> Any:
    """A copy of `node` (a pipeline dict) with `rewrite(value)` applied to the string values of `PATH_KEYS`."""
    if isinstance(node, dict):
        return {k: (rewrite(v) if k in PATH_KEYS and isinstance(v, str) else _rewrite_paths(v, rewrite))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_paths(v, rewrite) for v in node]
    return node


def relative_pipeline_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """
    `data` (a `Pipeline.to_dict()`) with every model/adapter/cache path inside `base` written as ``./<path relative
    to base>`` (POSIX separators); other values (hub ids, paths outside `base`, None) unchanged. The ``./`` prefix
    keeps them local paths for the components (``round_1/encoder`` alone would read as a Hugging Face id).
    """
    base = Path(base).resolve()

    def rewrite(value: str) -> str:
        path = Path(value).expanduser()
        if not path.is_absolute():
            return value
        try:
            return "./" + path.resolve().relative_to(base).as_posix()
        except ValueError:  # outside the run folder (the base LLM, say): kept as it is
            return value

    return _rewrite_paths(data, rewrite)


def resolve_pipeline_paths(data: dict[str, Any], base: str | Path) -> dict[str, Any]:
    """The inverse of `relative_pipeline_paths`: every ``./`` or ``../`` model/adapter/cache path made absolute
    against `base`."""
    base = Path(base).expanduser().resolve()
    return _rewrite_paths(data, lambda v: str((base / v).resolve()) if _is_relative_marker(v) else v)


def load_round_pipeline(path: str | Path, base: str | Path | None = None):
    """
    Load a round's ``pipeline.yaml`` from wherever its run folder now lives (moved or copied folders included).

    The YAML names the round's encoder, adapter and the run's expansion cache by paths relative to the run folder
    (``./round_1/encoder``); its ``metadata`` says where that folder is from the YAML's own folder (``..``). This
    reads the file, makes those paths absolute against that folder (or `base`) and builds the pipeline, so it loads
    from any working directory. (Plain ``Pipeline.loads(text)`` works too when run from inside the run folder.)
    A YAML written before these relative paths existed (absolute paths) loads unchanged.

    Usage:
    ```python
    from expandr_haystack.training import load_round_pipeline

    pipeline = load_round_pipeline("runs/tiny-cpu/round_2/pipeline.yaml")
    encoder = pipeline.get_component("retriever").model    # index documents with this encoder
    ```

    :param path: The ``pipeline.yaml`` file.
    :param base: The folder the ``./`` paths are relative to (default: from the YAML's metadata, else the YAML's
        folder).
    :returns: A `haystack.Pipeline`.
    """
    from haystack import Pipeline
    from haystack.marshal import YamlMarshaller

    import expandr_haystack  # noqa: F401 - registers the package with Haystack's deserialization allow-list

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`path`: no pipeline YAML at {str(path)!r}.")
    data = YamlMarshaller().unmarshal(path.read_text())
    if base is None:
        relative = (data.get("metadata") or {}).get(PATHS_BASE_KEY, ".")
        base = path.parent / relative
    return Pipeline.from_dict(resolve_pipeline_paths(data, base))


def round_pipeline_yaml(round_: int, expander, encoder: str | Path, query_weight: float = 0.5,
                        top_k: int = 10, base: str | Path | None = None) -> str:
    """
    The YAML of a ready search pipeline for one round's models: `expander` -> `ExpandRRetriever(encoder)` over an
    in-memory store (index the documents with `SentenceTransformersDocumentEmbedder(model=encoder)`, as the header
    comment says). A grounded `expander` (`GROUNDED_PROMPT`) gets a first pass: `ExpandRRetriever(encoder,
    top_k=expander.passages_k)` over the same store, its documents wired to the expander.

    Usage:
    ```python
    text = round_pipeline_yaml(1, LLMQueryExpander(adapter="runs/x/round_1/adapter"), "runs/x/round_1/encoder",
                               base="runs/x")    # paths relative to runs/x: ./round_1/encoder, ./round_1/adapter
    Pipeline.loads(text)                         # from inside runs/x; anywhere: load_round_pipeline(<file>)
    ```

    :param round_: The round (names the store's index and the header comment).
    :param expander: An `LLMQueryExpander` (serialised with its settings: model, adapter, cache, ...).
    :param encoder: The round's encoder folder.
    :param query_weight: w of the fused query vector (the round's, chosen on validation).
    :param top_k: Documents the retriever returns.
    :param base: The run folder: model, adapter and cache paths inside it are written as ``./<relative path>``
        (`relative_pipeline_paths`), and the pipeline's metadata records it as ``..`` (the YAML goes to
        ``<base>/round_<r>/pipeline.yaml``; `load_round_pipeline` reads it). None = absolute paths.
    :returns: A comment header (how to load, index and run it), then the pipeline's YAML.
    """
    from haystack import Pipeline
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from haystack.marshal import YamlMarshaller

    from expandr_haystack.components.retriever import ExpandRRetriever
    from expandr_haystack.options import FusionSettings

    encoder = str(Path(encoder).resolve())
    p = Pipeline(metadata={PATHS_BASE_KEY: ".."} if base is not None else None)
    store = InMemoryDocumentStore(index=f"expandr-round-{round_}", embedding_similarity_function="cosine")

    inputs = '{"expander": {"query": q}}'
    if expander.grounded:
        p.add_component("first_pass", ExpandRRetriever(document_store=store, model=encoder,
                                                       top_k=expander.passages_k))
        inputs = '{"first_pass": {"query": q}, "expander": {"query": q}}'
    p.add_component("expander", expander)
    p.add_component("retriever", ExpandRRetriever(document_store=store, model=encoder, top_k=top_k,
                                                  fusion=FusionSettings(query_weight=query_weight)))
    if expander.grounded:
        p.connect("first_pass.documents", "expander.documents")
    p.connect("expander.query", "retriever.query")
    p.connect("expander.expansions", "retriever.expansions")
    if base is None:
        return (f"# Search pipeline of round {round_}: index documents with SentenceTransformersDocumentEmbedder("
                f"model={encoder!r}), then run this with inputs {inputs}.\n{p.dumps()}")
    data = relative_pipeline_paths(p.to_dict(), base)
    shown = relative_pipeline_paths({"model": encoder}, base)["model"]
    return (f"# Search pipeline of round {round_}: paths are relative to the run folder; load it with\n"
            f"# expandr_haystack.training.load_round_pipeline(<this file>) from anywhere (or Pipeline.loads from inside "
            f"the run folder),\n# index documents with SentenceTransformersDocumentEmbedder(model=<the run folder>/"
            f"{shown[2:]}), then run it with inputs {inputs}.\n"
            f"{YamlMarshaller().marshal(data)}")


def absolute_if_local(model: str | None) -> str | None:
    """An existing local model path made absolute (a relative one would only load from today's working directory);
    hub ids, bundled names and None unchanged."""
    from expandr_haystack.checks import looks_like_local_path

    if model is not None and looks_like_local_path(model) and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


__all__ = ["PATHS_BASE_KEY", "PATH_KEYS", "absolute_if_local", "load_round_pipeline", "relative_pipeline_paths",
           "resolve_pipeline_paths", "round_pipeline_yaml"]
