"""The corpus pipeline: pinned sources -> clean documents -> GPT-2 tokens -> one memmap per split.

``prepare_corpus`` writes ``{split}.bin`` (uint16 token ids, ``<|endoftext|>`` after every document)
and ``manifest.json`` (what went in, what was dropped, how it was split, token counts). It is
idempotent: the manifest stores a fingerprint of the pinned sources and of this package's code, and
a call that finds a matching manifest with intact files returns it without touching anything. Every
file is written to a temporary name and renamed, and the old manifest is removed first, so an
interrupted run leaves either no corpus or a complete one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lmscale import __version__
from lmscale.data.corpus import (
    DEDUPE_RULE,
    SPLIT_RULE,
    SPLITS,
    Document,
    assign_splits,
    deduplicate,
    read_documents,
    wikitext_documents,
)
from lmscale.data.fetch import atomic_write, fetch_source, sha256_file
from lmscale.data.sources import DataSourceError, Source, corpus_dir, resolve_sources
from lmscale.data.sources import cache_dir as default_cache_dir
from lmscale.data.tokenizer import EOS_ID, load_tokenizer, tokenizer_identity

MANIFEST = "manifest.json"
DTYPE = np.dtype(np.uint16)  # GPT-2's 50257 ids fit
FIX = "build it with `lmscale data prepare` (or `make data`)"


def _fingerprint(sources: list[Source]) -> str:
    """Changes whenever a pin or this package's code changes, so a stale corpus is rebuilt."""
    code = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        code.update(path.name.encode() + b"\0" + path.read_bytes())
    pins = [dataclasses.asdict(s) for s in sources]
    payload = json.dumps({"lmscale": __version__, "code": code.hexdigest(), "sources": pins})
    return hashlib.sha256(payload.encode()).hexdigest()


def _load_wikitext(source: Source) -> Any:
    import datasets

    if datasets.config.HF_HUB_OFFLINE:
        raise DataSourceError(
            f"{source.name}: needs internet access to the Hugging Face Hub, but HF_HUB_OFFLINE or "
            "HF_DATASETS_OFFLINE is set; leave it out of the sources for the offline corpus"
        )
    try:
        return datasets.load_dataset("wikitext", source.version)
    except Exception as e:  # the Hub's failures come as many exception types
        raise DataSourceError(
            f"{source.name}: needs internet access to the Hugging Face Hub; "
            f"datasets.load_dataset('wikitext', {source.version!r}) failed: {e}"
        ) from e


def _tokenize(texts: list[str], tokenizer: Any) -> list[np.ndarray]:
    """GPT-2 ids of each text followed by ``<|endoftext|>``, through a ``datasets`` batched map."""
    from datasets import Dataset

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"input_ids": [ids + [EOS_ID] for ids in tokenizer(batch["text"])["input_ids"]]}

    dataset = Dataset.from_dict({"text": texts}).map(
        encode, batched=True, batch_size=32, remove_columns=["text"], desc="GPT-2 tokens"
    )
    column = dataset.data.column("input_ids").combine_chunks()
    flat = column.flatten().to_numpy().astype(DTYPE)
    offsets = column.offsets.to_numpy()
    offsets = offsets - offsets[0]
    return [flat[start:end] for start, end in itertools.pairwise(offsets)]


def _manifest(
    sources: list[Source],
    fingerprint: str,
    all_docs: list[Document],
    kept: list[Document],
    dropped: list[dict[str, Any]],
    tokens: list[np.ndarray],
    splits: list[str],
    archive_bytes: dict[str, int],
    seconds: float,
) -> dict[str, Any]:
    source_of = {d.doc_id: d.source for d in all_docs}
    dropped_per_source = Counter(source_of[entry["dropped"]] for entry in dropped)
    n_docs: Counter[tuple[str, str]] = Counter()  # keyed by (source, split)
    n_tokens: Counter[tuple[str, str]] = Counter()
    n_bytes: Counter[tuple[str, str]] = Counter()  # UTF-8 bytes of the text, for bits per byte
    for doc, split, ids in zip(kept, splits, tokens):
        n_docs[doc.source, split] += 1
        n_tokens[doc.source, split] += len(ids)
        n_bytes[doc.source, split] += len(doc.text.encode())
    names = [s.name for s in sources]
    source_entries = [
        {
            "name": s.name,
            "registry": s.registry,
            "package": s.package,
            "version": s.version,
            "sha256": s.sha256 or None,
            "license": s.license,
            "archive_bytes": archive_bytes.get(s.name),
            "documents": {
                "kept": sum(n_docs[s.name, split] for split in SPLITS),
                "dropped": dropped_per_source[s.name],
            },
            "bytes": sum(n_bytes[s.name, split] for split in SPLITS),
            "tokens": {split: n_tokens[s.name, split] for split in SPLITS},
        }
        for s in sources
    ]
    split_entries = {
        split: {
            "file": f"{split}.bin",
            "documents": sum(n_docs[name, split] for name in names),
            "tokens": sum(n_tokens[name, split] for name in names),
            "bytes": sum(n_bytes[name, split] for name in names),
        }
        for split in SPLITS
    }
    return {
        "lmscale_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "build_seconds": round(seconds, 1),
        "dtype": DTYPE.name,
        "document_separator": {"token": "<|endoftext|>", "id": EOS_ID, "where": "after every document"},
        "counting": "tokens include each document's separator; bytes are the documents' UTF-8 text",
        "tokenizer": tokenizer_identity(),
        "sources": source_entries,
        "splits": split_entries,
        "split_rule": SPLIT_RULE,
        "dedupe": {"rule": DEDUPE_RULE, "dropped": dropped},
        "documents": [
            {"id": d.doc_id, "title": d.title, "split": split, "tokens": len(ids)}
            for d, split, ids in zip(kept, splits, tokens)
        ],
    }


def _current_manifest(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest in ``out`` if it was built from the same inputs and its files are intact."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("fingerprint") != fingerprint:
        return None
    for info in manifest["splits"].values():
        path = out / info["file"]
        if not path.is_file() or path.stat().st_size != info["tokens"] * DTYPE.itemsize or "sha256" not in info:
            return None  # a manifest from before checksums is rebuilt (from the cached archives) to get them
        if sha256_file(path) != info["sha256"]:
            return None  # a changed byte: rebuild
    return manifest


def prepare_corpus(
    out_dir: Path | str | None = None,
    cache_dir: Path | str | None = None,
    force: bool = False,
    sources: list[str | Source] | None = None,
) -> dict[str, Any]:
    """Build (or find) the tokenized corpus in ``out_dir`` and return its manifest.

    ``sources`` are names from ``SOURCES`` (default: all of them) or ``"wikitext-2-raw-v1"``, which
    needs internet; their order decides which copy of a duplicated text is kept. Downloads are cached
    in ``cache_dir``. ``force`` rebuilds even when the manifest is current.
    """
    out = corpus_dir(out_dir)
    cache = default_cache_dir(cache_dir)
    selected = resolve_sources(sources)
    fingerprint = _fingerprint(selected)
    if not force:
        current = _current_manifest(out, fingerprint)
        if current is not None:
            return current
    started = time.perf_counter()
    docs: list[Document] = []
    archive_bytes: dict[str, int] = {}
    for source in selected:
        if source.registry == "huggingface":
            docs.extend(wikitext_documents(source, _load_wikitext(source)))
        else:
            archive = fetch_source(source, cache)
            archive_bytes[source.name] = archive.stat().st_size
            docs.extend(read_documents(source, archive))
    kept, dropped = deduplicate(docs)
    tokens = _tokenize([d.text for d in kept], load_tokenizer(cache))
    splits = assign_splits(kept, [len(ids) for ids in tokens])
    manifest = _manifest(
        selected,
        fingerprint,
        docs,
        kept,
        dropped,
        tokens,
        splits,
        archive_bytes,
        time.perf_counter() - started,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        chosen = [ids for ids, s in zip(tokens, splits) if s == split]
        atomic_write(out / f"{split}.bin", lambda f, chosen=chosen: [ids.tofile(f) for ids in chosen])
        manifest["splits"][split]["sha256"] = sha256_file(out / f"{split}.bin")
    atomic_write(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode() + b"\n"))
    return manifest


def load_manifest(out_dir: Path | str | None = None) -> dict[str, Any]:
    """The corpus manifest in ``out_dir`` (default ``data/corpus``)."""
    path = corpus_dir(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no corpus in {path.parent}: {path} is missing; {FIX}")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}); rebuild with `lmscale data prepare --force`"
        ) from e


def load_split(out_dir: Path | str | None, split: str) -> np.memmap:
    """A split's tokens as a read-only uint16 memmap, checked against the manifest's count."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    manifest = load_manifest(out_dir)
    info = manifest["splits"][split]
    path = corpus_dir(out_dir) / info["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing although {MANIFEST} lists it; {FIX} --force")
    expected = info["tokens"] * DTYPE.itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path} holds {actual} bytes but {MANIFEST} expects {expected} "
            f"({info['tokens']} uint16 tokens): "
            f"the corpus is stale or a write was interrupted; rebuild with `lmscale data prepare --force` "
            "(or `make data`)"
        )
    if info["tokens"] == 0:
        names = ", ".join(s["name"] for s in manifest["sources"])
        raise ValueError(
            f"split {split!r} is empty in {path.parent}: no document of its sources ({names}) went there; "
            "add sources with `lmscale data prepare --source ...`"
        )
    if "sha256" in info and _file_digest(path, path.stat().st_mtime_ns, actual) != info["sha256"]:
        raise ValueError(
            f"{path} does not match the sha256 {MANIFEST} records for it: a byte changed since it was written "
            "(a flipped bit or a partial copy); rebuild with `lmscale data prepare --force` (or `make data`)"
        )
    return np.memmap(path, dtype=DTYPE, mode="r")


@functools.lru_cache(maxsize=16)
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    """sha256 of a split file, once per process and version of the file (≈ 30 ms for the 13 MB train split)."""
    return sha256_file(path)


def manifest_table(manifest: dict[str, Any]) -> Any:
    """Documents and tokens per source and split, with a total row, as a ``pandas.DataFrame``."""
    import pandas as pd

    rows = [
        {
            "source": s["name"],
            "package": f"{s['registry']}:{s['package']} {s['version']}",
            "documents": s["documents"]["kept"],
            "dropped": s["documents"]["dropped"],
            **s["tokens"],
        }
        for s in manifest["sources"]
    ]
    total = {"source": "total", "package": "", "documents": sum(r["documents"] for r in rows)}
    total["dropped"] = sum(r["dropped"] for r in rows)
    total.update({split: manifest["splits"][split]["tokens"] for split in SPLITS})
    return pd.DataFrame([*rows, total])
