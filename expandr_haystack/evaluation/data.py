"""
BEIR-layout collections: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Ids are always strings; qrels may have a header row or not; empty titles are fine. Problems name the file and line.
On a well-formed folder `load_collection` reads what ``beir.datasets.data_loader.GenericDataLoader(folder).load(split)``
reads (the same corpus, queries and qrels), less judgements that name unknown documents or queries (warned).

A collection is named by a folder path, by a bundled name (``cranfield``), or by a BEIR dataset name (``scifact``,
``nfcorpus``, ...; ``cqadupstack/android`` for one CQADupStack forum), downloaded once with ``beir.util`` into
``$EXPANDR_HOME/beir/<name>``; offline, the error says where to put the unzipped folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from haystack import Document

logger = logging.getLogger(__name__)

#: The public BEIR datasets (the zips `beir.util.download_and_unzip` fetches); BioASQ, Signal-1M, TREC-NEWS and
#: Robust04 are not downloadable and must be built locally, then passed as a folder.
BEIR_DATASETS = ("arguana", "climate-fever", "cqadupstack", "dbpedia-entity", "fever", "fiqa", "hotpotqa", "msmarco",
                 "nfcorpus", "nq", "quora", "scidocs", "scifact", "trec-covid", "webis-touche2020")
#: Where BEIR's datasets are published (the address BEIR's own examples download from).
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"


class DataError(ValueError):
    """A collection file is missing or malformed; the message names the file (and line)."""


@dataclass
class Collection:
    """A BEIR collection restricted to one split's judged queries."""

    corpus: dict[str, dict[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    split: str
    path: Path
    warnings: list[str] = field(default_factory=list)

    def document(self, doc_id: str) -> Document:
        """One corpus entry as a Haystack Document: `content` = text, `meta["title"]` = title, id = the corpus id.
        Its embedded text is `core.text.document_text(document)` (title + "\\n" + text)."""
        entry = self.corpus[doc_id]
        return Document(id=doc_id, content=entry["text"], meta={"title": entry["title"]})

    def documents(self) -> list[Document]:
        """Every corpus entry as a Haystack Document (see `document`)."""
        return [self.document(doc_id) for doc_id in self.corpus]

    def subset(self, query_ids: Iterable[str], split: str | None = None) -> Collection:
        """The same corpus with only `query_ids` (and their judgements); `split` names the result."""
        ids = [q for q in query_ids if q in self.queries]
        return Collection(corpus=self.corpus, queries={q: self.queries[q] for q in ids},
                          qrels={q: self.qrels[q] for q in ids if q in self.qrels}, split=split or self.split,
                          path=self.path, warnings=list(self.warnings))

    def split_validation(self, size: float = 0.2, seed: int = 0) -> tuple[Collection, Collection]:
        """
        Carve a validation split out of these (training) queries: a seeded random `size` (a fraction in (0, 1) or
        a number of queries), never the evaluation split. Returns ``(rest, validation)``; their query ids are
        disjoint and together are this collection's.
        """
        import random

        ids = sorted(self.queries, key=_natural_key)
        n = round(size * len(ids)) if isinstance(size, float) else int(size)
        if not 0 < n < len(ids):
            raise ValueError(f"`size` must leave at least one query on each side of {len(ids)}; got {size!r}.")
        chosen = set(random.Random(seed).sample(ids, n))
        return (self.subset([q for q in ids if q not in chosen], f"{self.split}-rest"),
                self.subset([q for q in ids if q in chosen], f"{self.split}-validation"))

    def relevant(self, query_id: str) -> list[str]:
        """Ids of the documents judged relevant (score > 0) for a query, best grade first."""
        judged = self.qrels.get(query_id, {})
        return [d for d, s in sorted(judged.items(), key=lambda x: (-x[1], x[0])) if s > 0]


def bundled_path(name: str = "cranfield") -> Path:
    """Folder of a collection shipped with the package (``cranfield``)."""
    path = Path(str(resources.files("expandr_haystack") / "bundled" / name))
    if not (path / "corpus.jsonl").exists():
        available = sorted(p.name for p in path.parent.iterdir() if p.is_dir())
        raise DataError(f"No bundled collection {name!r}; available: {available}.")
    return path


def bundled_names() -> list[str]:
    """The collections shipped with the package."""
    root = Path(str(resources.files("expandr_haystack") / "bundled"))
    return sorted(p.name for p in root.iterdir() if (p / "corpus.jsonl").exists())


def beir_cache_dir() -> Path:
    """Where BEIR datasets are downloaded: ``$EXPANDR_HOME/beir`` (default ``~/.cache/expandr_haystack/beir``)."""
    from expandr_haystack.models import expandr_home

    return expandr_home() / "beir"


def download_beir(name: str, cache_dir: str | Path | None = None) -> Path:
    """
    The folder of BEIR dataset `name` (e.g. ``scifact``) under `cache_dir` (default `beir_cache_dir()`),
    downloaded and unzipped once with ``beir.util.download_and_unzip`` (into a staging folder first, so an
    interrupted download leaves nothing half-written). Offline, a `DataError` says where to put the data instead.
    """
    if name not in BEIR_DATASETS:
        raise DataError(f"{name!r} is not a downloadable BEIR dataset; these are: {', '.join(BEIR_DATASETS)}.")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else beir_cache_dir()
    target = cache / name
    if (target / "corpus.jsonl").exists() or (target.is_dir() and any(target.glob("*/corpus.jsonl"))):
        return target
    try:
        from beir import util as beir_util
    except ImportError as exc:
        raise ImportError(f"Downloading the BEIR dataset {name!r} needs beir: pip install 'expandr-haystack[eval]' "
                          f"(or pass the unzipped {name} folder as a path).") from exc
    url = BEIR_URL.format(name=name)
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache))
    logger.warning("Downloading the BEIR dataset %r from %s into %s (once)", name, url, target)
    try:
        unzipped = Path(beir_util.download_and_unzip(url, str(staging)))
        if target.exists():  # an empty or broken earlier folder
            shutil.rmtree(target)
        unzipped.rename(target)
    except Exception as exc:  # no network, proxy, HTTP error page, broken zip: one clear way forward
        raise DataError(
            f"Could not download the BEIR dataset {name!r} from {url} ({type(exc).__name__}: {exc}). Offline? "
            f"Download {name}.zip from that address where there is network and unzip it into {cache} (so that "
            f"{target / 'corpus.jsonl'} exists), or unzip it anywhere and pass that folder instead of the name "
            f"(expandr eval /path/to/{name})."
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_collection_path(data: str | Path) -> Path:
    """
    A BEIR folder path; the name of a bundled collection (``cranfield``); or the name of a BEIR dataset
    (``scifact``, or ``cqadupstack/<forum>``), downloaded once into `beir_cache_dir()` (see `download_beir`).
    """
    if isinstance(data, str) and not Path(data).expanduser().exists():
        head, _, rest = data.partition("/")
        if head in BEIR_DATASETS:
            root = download_beir(head) / rest if rest else download_beir(head)
            if not root.is_dir():
                forums = sorted(p.name for p in root.parent.iterdir() if p.is_dir())
                raise DataError(f"BEIR dataset {head!r} has no {rest!r}; it has: {forums}.")
            return root
        if "/" not in data:
            if data in bundled_names():
                return bundled_path(data)
            raise DataError(f"No bundled collection or BEIR dataset {data!r}, and no such folder. Bundled: "
                            f"{bundled_names()}; BEIR (downloaded once): {', '.join(BEIR_DATASETS)}; or pass a "
                            f"BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).")
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataError(f"Collection folder {root} does not exist (or name a bundled collection: 'cranfield', or a "
                        f"BEIR dataset such as 'scifact').")
    return root


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.exists():
        raise DataError(f"Missing file {path} (BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv).")
    with path.open(encoding="utf-8") as f:
        return parse_jsonl(f, path, required, DataError)


def parse_jsonl(lines: Iterable[str], path: Path, required: tuple[str, ...], error: type[Exception] = DataError,
                advice: str = "") -> list[dict]:
    """
    JSON objects from the lines of a JSONL file (blank lines skipped). A line that is not JSON, not an object or
    lacks a `required` key raises `error` naming the file and line (`advice` is appended to the message).
    """
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{lineno}: not valid JSON ({exc.msg}){advice}.") from exc
        if not isinstance(row, dict) or any(k not in row for k in required):
            raise error(f"{path}:{lineno}: expected an object with keys {list(required)}; got {line[:120]!r}.")
        rows.append(row)
    return rows


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """``{query_id: {doc_id: grade}}`` from a BEIR qrels TSV (header optional; 3 or 4 columns)."""
    if not path.exists():
        splits = sorted(p.stem for p in path.parent.glob("*.tsv")) if path.parent.exists() else []
        raise DataError(f"Missing qrels file {path}; splits available: {splits or 'none'}.")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\n").split("\t") if "\t" in line else line.split()
            if not parts or not line.strip():
                continue
            if len(parts) == 4:  # TREC style: qid, iteration, docid, grade
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) != 3:
                raise DataError(f"{path}:{lineno}: expected 'query-id<TAB>corpus-id<TAB>score'; got {line.strip()!r}.")
            try:
                grade = int(float(parts[2]))
            except ValueError as exc:
                if lineno == 1:
                    continue  # header row
                raise DataError(f"{path}:{lineno}: score {parts[2]!r} is not a number.") from exc
            qrels.setdefault(str(parts[0]), {})[str(parts[1])] = grade
    return qrels


def load_collection(path: str | Path, split: str = "test", max_queries: int | None = None) -> Collection:
    """
    Load a BEIR-layout folder, keeping only the queries judged in ``qrels/<split>.tsv``.

    A judged document that is not in the corpus is dropped with a warning (counted); a judged query that is not in
    queries.jsonl likewise. An empty split is an error.
    """
    root = resolve_collection_path(path)
    if (root / "corpus.jsonl").exists() is False and len([p for p in root.iterdir() if p.is_dir()]) == 1:
        # BEIR's downloader unzips into <name>/<name>/
        inner = next(p for p in root.iterdir() if p.is_dir())
        if (inner / "corpus.jsonl").exists():
            root = inner
    if not (root / "corpus.jsonl").exists():
        parts = sorted(p.name for p in root.iterdir() if (p / "corpus.jsonl").exists()) if root.is_dir() else []
        if parts:  # e.g. cqadupstack: one collection per forum
            raise DataError(f"{root} holds several collections, one per folder: {parts}; pass one of them "
                            f"(e.g. {root / parts[0]}).")
    corpus = {}
    for row in _read_jsonl(root / "corpus.jsonl", ("_id", "text")):
        corpus[str(row["_id"])] = {"title": str(row.get("title") or ""), "text": str(row.get("text") or "")}
    queries = {str(r["_id"]): str(r["text"]) for r in _read_jsonl(root / "queries.jsonl", ("_id", "text"))}
    qrels = load_qrels(root / "qrels" / f"{split}.tsv")
    warnings = []
    unknown_docs = sum(1 for q in qrels.values() for d in q if d not in corpus)
    if unknown_docs:
        warnings.append(f"{root / 'qrels' / f'{split}.tsv'}: {unknown_docs} judgement(s) name documents not in "
                        f"corpus.jsonl; ignored.")
    unknown_queries = [q for q in qrels if q not in queries]
    if unknown_queries:
        warnings.append(f"{root / 'qrels' / f'{split}.tsv'}: {len(unknown_queries)} judged query id(s) not in "
                        f"queries.jsonl (e.g. {unknown_queries[0]!r}); ignored.")
    qrels = {q: {d: s for d, s in j.items() if d in corpus} for q, j in qrels.items() if q in queries}
    qrels = {q: j for q, j in qrels.items() if j}
    if not qrels:
        raise DataError(f"{root / 'qrels' / f'{split}.tsv'}: split {split!r} has no judged query that is in "
                        f"queries.jsonl with a document in corpus.jsonl.")
    ids = sorted(qrels, key=_natural_key)
    if max_queries is not None:
        ids = ids[:max_queries]
    for w in warnings:
        logger.warning(w)
    return Collection(corpus=corpus, queries={q: queries[q] for q in ids}, qrels={q: qrels[q] for q in ids},
                      split=split, path=root, warnings=warnings)


def _natural_key(s: str):
    return (0, int(s), s) if s.isdigit() else (1, 0, s)

__all__ = ["BEIR_DATASETS", "BEIR_URL", "Collection", "DataError", "beir_cache_dir", "bundled_names", "bundled_path",
           "download_beir", "load_collection", "load_qrels", "parse_jsonl", "resolve_collection_path"]
