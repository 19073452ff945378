"""The record store: one JSON line per run under ``data/results/<experiment>/``.

A record is the only way a number reaches the book, so it carries everything needed to trust and
rerun it: the config, the seed, final metrics, curves, and provenance (git commit and dirty flag,
library versions, hardware, command, date). Files are written atomically; a malformed file raises
an error naming it instead of silently dropping a run.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmscale import __version__
from lmscale.paths import repo_root, results_dir

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("schema", "experiment", "run_id", "kind", "config", "seed", "metrics", "provenance")
RECORD_FIELDS = (*REQUIRED_FIELDS, "status", "curves")  # a run may add others (``make_record``'s extra)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class RecordError(ValueError):
    """A result record that cannot be read or written; the message names the file."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _versions() -> dict[str, str]:
    """Installed versions, read from package metadata so that nothing heavy is imported to ask."""
    versions = {"python": platform.python_version(), "lmscale": __version__}
    for name in ("torch", "numpy", "triton", "transformers", "fla-core"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _hardware(device: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device or "cpu",
    }
    torch = sys.modules.get("torch")
    if torch is not None and device and device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the code that runs: stated by ``LMSCALE_GIT_COMMIT``/``LMSCALE_GIT_DIRTY`` (the
    CLI's ``--git-commit``) for a copy of the tree whose .git is absent or stale, as on the GPU machine;
    else read from the checkout the first time this process asks (``lmscale``'s CLI asks at its start).
    (None, None) when neither says."""
    if os.environ.get("LMSCALE_GIT_COMMIT"):
        return os.environ["LMSCALE_GIT_COMMIT"], os.environ.get("LMSCALE_GIT_DIRTY", "").lower() == "true"
    return _checkout_commit()


@functools.cache
def _checkout_commit() -> tuple[str | None, bool | None]:
    """Read once per process: a run that lasts while commits land in the checkout (notes, records) still
    names the commit whose code it loaded, not the one that happens to be HEAD when a record is written."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def code_changed_since(commit: str | None, paths: tuple[str, ...] = ("src",)) -> bool | None:
    """Whether the library under ``paths`` differs between ``commit`` and the checkout (None: unknown,
    e.g. no .git or a commit this clone lacks). A chapter uses it to keep numbers of code that has
    changed since apart from current ones."""
    if not commit or _git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return None
    diff = _git("diff", "--name-only", commit, "--", *paths)
    return None if diff is None else bool(diff)


def require_commit(device: str | None) -> None:
    """A GPU record must say which code it measured: refuse to make one without a commit.

    Call it before a GPU run starts, so that no device time is spent on numbers that cannot be written.
    """
    if device and str(device).startswith("cuda") and code_commit()[0] is None:
        raise RecordError(f"no git commit for a record made on {device}: this tree has no usable .git; pass "
                          "--git-commit $(git rev-parse HEAD) (or set LMSCALE_GIT_COMMIT) so the record names "
                          "the code it measured")


def provenance(device: str | None = None, command: str | None = None) -> dict[str, Any]:
    """What made a number: code version, libraries, hardware, command line and date."""
    commit, dirty = code_commit()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "versions": _versions(),
        "hardware": _hardware(device),
        "command": command if command is not None else " ".join(sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise RecordError(f"{kind} name {name!r} must be letters, digits, '.', '_' or '-' (it becomes a path)")


def _jsonable(value: Any) -> Any:
    """Refuse NaN/inf instead of writing JSON that other tools reject."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def make_record(
    experiment: str,
    *,
    kind: str,
    config: dict[str, Any],
    seed: int,
    metrics: dict[str, Any],
    curves: dict[str, list[dict[str, Any]]] | None = None,
    run_id: str | None = None,
    device: str | None = None,
    status: str = "ok",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a record with provenance; ``write_record`` stores it. A GPU record needs a commit."""
    require_commit(device)
    _check_name("experiment", experiment)
    run_id = run_id or f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    _check_name("run_id", run_id)
    record = {
        "schema": SCHEMA_VERSION,
        "experiment": experiment,
        "run_id": run_id,
        "kind": kind,
        "status": status,
        "config": config,
        "seed": seed,
        "metrics": metrics,
        "curves": curves or {},
        "provenance": provenance(device),
    }
    if extra:
        record.update(extra)
    return _jsonable(record)


def validate_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise RecordError(f"{where}: record lacks field(s) {missing}; required: {list(REQUIRED_FIELDS)}")
    if record["schema"] != SCHEMA_VERSION:
        raise RecordError(f"{where}: schema {record['schema']!r}, this lmscale reads schema {SCHEMA_VERSION}")
    for name in ("config", "metrics", "provenance"):
        if not isinstance(record[name], dict):
            raise RecordError(f"{where}: field '{name}' must be an object")
    return record


CHECKSUM = "checksum"  # BLAKE2b of the line's other fields; read_records verifies and removes it


def _canonical(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False)


def _record_line(record: dict[str, Any]) -> str:
    """A record as its file line, with the checksum that lets a reader detect a changed byte."""
    body = {k: v for k, v in record.items() if k != CHECKSUM}
    digest = hashlib.blake2b(_canonical(body).encode(), digest_size=16).hexdigest()
    return _canonical({**body, CHECKSUM: f"blake2b:{digest}"})


def write_record(record: dict[str, Any], root: Path | None = None) -> Path:
    """Write ``<root>/<experiment>/<run_id>.jsonl`` atomically (temp file, then rename)."""
    validate_record(record, f"record {record.get('run_id')!r}")
    path = Path(root or results_dir()) / record["experiment"] / f"{record['run_id']}.jsonl"
    return _write_atomically(path, _record_line(record) + "\n")


def write_records(records: list[dict[str, Any]], path: Path) -> Path:
    """Write many records as the lines of one ``.jsonl`` file, atomically (temp file, then rename).

    For runs that make many measurements on a machine that returns only a few files (a benchmark
    writes one file per invocation); every record is validated before anything is written.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        raise RecordError(f"{path}: a record file must end in .jsonl (read_records and load_records look for it)")
    lines = [_record_line(validate_record(r, f"{path} record {i}")) for i, r in enumerate(records, 1)]
    return _write_atomically(path, "".join(line + "\n" for line in lines))


def _write_atomically(path: Path, text: str) -> Path:
    """Temp file in the same folder, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_records(path: Path) -> list[dict[str, Any]]:
    """All records of one ``.jsonl`` file (one per line); any bad line names the file and line."""
    path = Path(path)
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: cannot read result record ({e})") from e
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(
                f"{path}:{number}: malformed result record ({e.msg}); fix or delete the file and rerun the run"
            ) from e
        records.append(_verified(validate_record(record, f"{path}:{number}"), f"{path}:{number}"))
    return records


def _verified(record: dict[str, Any], where: str) -> dict[str, Any]:
    """The record without its checksum, after checking it (records written before checksums have none)."""
    if CHECKSUM not in record:
        return record
    body = {k: v for k, v in record.items() if k != CHECKSUM}
    if _record_line(body) != _canonical(record):
        raise RecordError(f"{where}: the record's checksum does not match its content: the line changed after "
                          "it was written (a flipped bit, a truncated copy or a hand edit); restore the file from "
                          "git (`git checkout -- <file>`) or delete it and rerun the run")
    return body


def iter_records(experiment: str | None = None, root: Path | None = None) -> Iterable[dict[str, Any]]:
    base = Path(root or results_dir())
    pattern = f"{experiment}/*.jsonl" if experiment else "*/*.jsonl"
    for path in sorted(base.glob(pattern)):
        yield from read_records(path)


def load_records(experiment: str | None = None, root: Path | None = None):
    """One row per run: identity, ``config.*``, ``metrics.*`` and provenance columns, curves kept as objects."""
    import pandas as pd

    rows = []
    for record in iter_records(experiment, root):
        row = {k: record[k] for k in ("experiment", "run_id", "kind", "status", "seed")}
        row.update({f"config.{k}": v for k, v in _flatten(record["config"]).items()})
        row.update({f"metrics.{k}": v for k, v in record["metrics"].items()})
        prov = record["provenance"]
        row.update(
            {
                "git_commit": prov.get("git_commit"),
                "git_dirty": prov.get("git_dirty"),
                "device": prov.get("hardware", {}).get("device"),
                "hardware": prov.get("hardware", {}).get("gpu") or prov.get("hardware", {}).get("cpu"),
                "torch": prov.get("versions", {}).get("torch"),
                "date": prov.get("date"),
            }
        )
        row["curves"] = record.get("curves", {})
        row.update({k: v for k, v in record.items() if k not in RECORD_FIELDS})  # e.g. a failure's error
        rows.append(row)
    return pd.DataFrame(rows)


def load_curves(experiment: str, curve: str = "train", root: Path | None = None):
    """Long-form curve points (one row per logged step) with the run's identity, ready for plotting."""
    import pandas as pd

    rows = []
    for record in iter_records(experiment, root):
        for point in record.get("curves", {}).get(curve, []):
            rows.append({"run_id": record["run_id"], "seed": record["seed"], **_flatten(record["config"]), **point})
    return pd.DataFrame(rows)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
