"""
Sharding an expansion job over processes or machines, and merging the shards back: the pure logic (no model).

The query list (T queries, in input order) is cut into blocks of `block_size` consecutive queries, and each block is
expanded by one call of the expander. Shard I of N takes blocks I, I+N, I+2N, ... (strided: every shard gets a like
mix of short and long queries, and appending queries to the list never moves a block to another shard). Blocks, not
single rows, are the unit because a row's float32 logits depend slightly (~1e-5: the attention's reductions follow the
batch's padded layout, and a one-row matmul rounds otherwise) on which rows share its batch, enough to flip a draw from
a flat distribution now and then (1 row of 60 Cranfield queries x 32 tokens, bundled SmolLM2, batches of 5 cut from
all 60 vs from blocks of 10). The expander batches within one call, so with whole blocks every row is computed in
exactly the same batch by one process or by N, and the merged file is byte-identical to the one-process file.

Each output file ``F`` has a sidecar ``F.meta.json`` (`meta_path`): the format, the shard ("I/N", or None for a whole
list), the queries' count and digest, and the generation settings (model fingerprint, engine, sampling settings,
batch and block size). `merge_shards` checks that a set of shard files is a complete partition made with the same
settings and queries, and writes the rows in query order.

Usage:
```python
from expandr_haystack.shards import Shard, merge_shards, shard_blocks

shard = Shard.parse("1/4")                          # Shard(index=1, count=4)
shard_blocks(total=10, block_size=2, shard=shard)   # [range(2, 4)]  (block 1; block 5 does not exist)
shard.path("exp.jsonl")                             # PosixPath('exp.shard-1-of-4.jsonl')
merge_shards("exp.jsonl")                           # finds exp.shard-*-of-*.jsonl, checks them, writes exp.jsonl
```
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expandr_haystack.files import atomic_write_json, atomic_writer

logger = logging.getLogger(__name__)

#: The `format` of an output's meta file; bumped when the row layout or the meta's meaning changes.
FORMAT = "expandr-expand/1"
#: The meta file of an output ``F`` is ``F`` + this.
META_SUFFIX = ".meta.json"
#: The meta entries two files must agree on to be shards of one job (the rest is information about the run).
JOB_KEYS = ("format", "queries", "settings")


class ShardError(ValueError):
    """Shard files that do not form one complete job; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count); ``Shard()`` is the whole list."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str, argument: str = "shard") -> Shard:
        """``"I/N"`` -> ``Shard(I, N)``; anything else is a ValueError naming `argument`."""
        index, sep, count = str(text).strip().partition("/")
        try:
            i, n = int(index), int(count)
        except ValueError:
            i = n = -1
        if not sep or n < 1 or not 0 <= i < n:
            raise ValueError(f"`{argument}` must be I/N with 0 <= I < N (shard I of N shards, e.g. 0/4); "
                             f"got {text!r}.")
        return cls(i, n)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def path(self, out: str | Path) -> Path:
        """The file this shard writes for the job's output `out`: ``exp.jsonl`` -> ``exp.shard-1-of-4.jsonl``
        (`out` itself for the whole list)."""
        out = Path(out)
        if self.count == 1:
            return out
        return out.with_name(f"{out.stem}.shard-{self.index}-of-{self.count}{out.suffix}")


def check_shard(value: Any, argument: str = "shard") -> Shard:
    """`value` as a `Shard` (a Shard, or text ``"I/N"``), else a ValueError naming `argument`."""
    return value if isinstance(value, Shard) else Shard.parse(value, argument)


def blocks(total: int, block_size: int) -> list[range]:
    """The row indices of `total` rows cut into consecutive blocks of `block_size` (the last may be shorter)."""
    return [range(start, min(start + block_size, total)) for start in range(0, total, block_size)]


def shard_blocks(total: int, block_size: int, shard: Shard) -> list[range]:
    """The blocks of `shard`: blocks I, I+N, I+2N, ... of `blocks(total, block_size)`."""
    return blocks(total, block_size)[shard.index::shard.count]


def queries_digest(queries: Iterable[tuple[str, str]]) -> str:
    """A sha256 over the ``(query_id, text)`` pairs in order: equal digests, equal query lists."""
    digest = hashlib.sha256()
    for query_id, text in queries:
        digest.update((json.dumps([query_id, text], ensure_ascii=False) + "\n").encode("utf-8"))
    return digest.hexdigest()


def meta_path(path: str | Path) -> Path:
    """The meta file of output `path` (``exp.jsonl`` -> ``exp.jsonl.meta.json``)."""
    path = Path(path)
    return path.with_name(path.name + META_SUFFIX)


def default_cache_path(path: str | Path) -> Path:
    """The expansion cache an output file gets by default, next to it: one per shard, never shared by machines
    (``exp.shard-0-of-4.jsonl`` -> ``exp.shard-0-of-4.jsonl.cache.sqlite``)."""
    path = Path(path)
    return path.with_name(path.name + ".cache.sqlite")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta of output `path`, checked for its format; a ShardError naming the file otherwise."""
    meta_file = meta_path(path)
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardError(f"{path}: no {meta_file.name} next to it; was it written by `expandr expand`?") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"{meta_file}: not valid JSON ({exc.msg}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in JOB_KEYS):
        raise ShardError(f"{meta_file}: not an `expandr expand` meta file of format {FORMAT!r}.")
    return meta


def differences(a: dict[str, Any], b: dict[str, Any], keys: Sequence[str] = JOB_KEYS) -> list[str]:
    """What differs between two metas in `keys`, one ``key.field: A vs B`` line each (empty when they agree)."""
    out = []
    for key in keys:
        left, right = a.get(key), b.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            out += [f"{key}.{k}: {left.get(k)!r} vs {right.get(k)!r}" for k in sorted(set(left) | set(right))
                    if left.get(k) != right.get(k)]
        elif left != right:
            out.append(f"{key}: {left!r} vs {right!r}")
    return out


def find_shard_files(out: str | Path) -> list[Path]:
    """The shard files of job output `out` in its folder (``exp.shard-*-of-*.jsonl``), sorted by name."""
    out = Path(out)
    pattern = re.compile(re.escape(out.stem) + r"\.shard-\d+-of-\d+" + re.escape(out.suffix) + "$")
    return sorted(p for p in out.parent.glob(f"{out.stem}.shard-*-of-*{out.suffix}") if pattern.fullmatch(p.name))


def _shard_rows(path: Path, shard: Shard, expected: int) -> list[tuple[str, str]]:
    """``(query_id, query)`` of every row of a shard file, checked complete (`expected` rows, whole lines)."""
    rerun = f"rerun `expandr expand ... --shard {shard}` with the same settings to finish it"
    pairs = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                raise ShardError(f"{path}:{lineno}: a partial last line (the run was killed or is still going); "
                                 f"{rerun}.")
            try:
                row = json.loads(line)
                pairs.append((row["query_id"], row["query"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ShardError(f"{path}:{lineno}: not a row {{\"query_id\", \"query\", \"expansions\"}}.") from None
    if len(pairs) < expected:
        raise ShardError(f"{path}: {len(pairs)} of its {expected} rows (incomplete); {rerun}.")
    if len(pairs) > expected:
        raise ShardError(f"{path}: {len(pairs)} rows, but shard {shard} has {expected} (duplicated rows?).")
    return pairs


def merge_shards(out: str | Path, shard_files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """
    Merge the shard files of one `expandr expand` job into `out` (rows in query order, written atomically, each
    shard's bytes copied as they are) and write its meta (shard None, `merged_from`).

    :param shard_files: The shard files; empty = every ``<out stem>.shard-*-of-*<out suffix>`` next to `out`.
    :returns: The meta written for `out`.
    :raises ShardError: (naming the file) a shard missing, present twice, incomplete or with extra rows; files of
        another job (other settings, queries or shard count); rows that are not the job's queries.
    """
    out = Path(out)
    files = [Path(f) for f in shard_files] or find_shard_files(out)
    if not files:
        raise ShardError(f"no shard files {out.stem}.shard-I-of-N{out.suffix} next to {out}; pass them after OUT.")
    if any(f.resolve() == out.resolve() for f in files):
        raise ShardError(f"{out}: the merged file must not be one of the shard files.")
    metas = {f: read_meta(f) for f in files}
    first = files[0]
    reference = metas[first]
    by_index: dict[int, Path] = {}
    count = None
    for f, meta in metas.items():
        if meta.get("shard") is None:
            raise ShardError(f"{f}: not a shard (its meta has no shard I/N); it holds a whole job already.")
        shard = Shard.parse(meta["shard"], f"{meta_path(f)}: shard")
        count = shard.count if count is None else count
        if shard.count != count:
            raise ShardError(f"{f}: shard {shard}, but {first} is shard {reference['shard']}: shards of jobs cut "
                             f"in a different number of shards.")
        diff = differences(reference, meta)
        if diff:
            raise ShardError(f"{f}: made with other settings or queries than {first}: {'; '.join(diff)}.")
        if shard.index in by_index:
            raise ShardError(f"{f} and {by_index[shard.index]} are both shard {shard}.")
        by_index[shard.index] = f
    missing = [Shard(i, count) for i in range(count) if i not in by_index]
    if missing:
        names = ", ".join(f"{s} ({s.path(out).name})" for s in missing)
        raise ShardError(f"{len(missing)} of {count} shards missing: {names}.")

    total, block_size = reference["queries"]["total"], reference["settings"]["block_size"]
    all_blocks = blocks(total, block_size)
    merged: list[tuple[str, str] | None] = [None] * total
    for index, f in by_index.items():
        shard = Shard(index, count)
        own = shard_blocks(total, block_size, shard)
        rows = iter(_shard_rows(f, shard, sum(len(b) for b in own)))
        for block in own:
            for i in block:
                merged[i] = next(rows)
    seen: dict[str, int] = {}
    for i, (query_id, _) in enumerate(merged):
        if query_id in seen:
            files_of = [by_index[b % count] for b in (seen[query_id] // block_size, i // block_size)]
            raise ShardError(f"query id {query_id!r} is in {files_of[0]} and again in {files_of[1]}.")
        seen[query_id] = i
    if queries_digest(merged) != reference["queries"]["sha256"]:
        raise ShardError(f"the rows of {', '.join(map(str, files))} are not the queries their meta files name "
                         f"(a shard file edited, or mixed with another job's).")

    handles = [by_index[i].open("rb") for i in range(count)]
    try:
        with atomic_writer(out, "wb") as target:
            for b, block in enumerate(all_blocks):
                source = handles[b % count]
                for _ in block:
                    target.write(source.readline())
    finally:
        for h in handles:
            h.close()
    machines = {json.dumps(metas[f].get("run", {}).get("machine"), sort_keys=True) for f in files}
    if len(machines) > 1:
        logger.warning("The shards of %s were made on different kinds of machine (%s): each row is the text its "
                       "machine samples, but a one-process run on one of them may differ in rare tokens (float "
                       "rounding).", out, "; ".join(sorted(machines)))
    meta = {**{k: reference[k] for k in JOB_KEYS}, "shard": None, "rows": total,
            "merged_from": [{"file": by_index[i].name, "run": metas[by_index[i]].get("run")} for i in range(count)]}
    atomic_write_json(meta_path(out), meta)
    return meta


__all__ = ["FORMAT", "JOB_KEYS", "META_SUFFIX", "Shard", "ShardError", "blocks", "check_shard", "default_cache_path",
           "differences", "find_shard_files", "merge_shards", "meta_path", "queries_digest", "read_meta",
           "shard_blocks"]
