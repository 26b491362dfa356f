"""Blob storage: a local folder with generated keys and atomic writes.

Keys are produced here from content hashes or ids, never taken from users, and are checked
against a strict pattern before they touch the file system.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

_KEY = re.compile(r"^[a-z0-9_-]+(/[a-z0-9_.-]+)+$")


class BlobMissing(Exception):
    """The blob for a key does not exist (or failed its checksum)."""


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def image_key(sha256: str) -> str:
    """Storage key of an original image (content addressed)."""
    return f"images/{sha256[:2]}/{sha256}"


def model_key(project_id: int, run_id: int, name: str) -> str:
    """Storage key of a model artifact produced by a training run."""
    return f"models/p{project_id}/run{run_id}/{name}"


class LocalBlobStore:
    """Blobs as files below one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def _path(self, key: str) -> Path:
        if not _KEY.match(key) or ".." in key:
            raise ValueError(f"invalid storage key: {key!r}")
        path = (self.root / key).resolve()
        if self.root not in path.parents:
            raise ValueError(f"invalid storage key: {key!r}")
        return path

    def put(self, key: str, data: bytes, sync: bool = True) -> None:
        """Write ``data`` atomically: readers see the old blob, the new one, never half.

        ``sync=False`` leaves the flush to disk to a later :meth:`sync` of many blobs at once.
        """
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, src: BinaryIO, max_bytes: int | None = None) -> int:
        """Copy a file object into a blob atomically, in chunks; returns the bytes written.

        Raises ``ValueError`` (nothing stored) when it holds more than ``max_bytes``.
        """
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        written = 0
        try:
            with os.fdopen(fd, "wb") as fh:
                while chunk := src.read(1 << 20):
                    written += len(chunk)
                    if max_bytes is not None and written > max_bytes:
                        raise ValueError(f"more than {max_bytes} bytes")
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return written

    def sync(self, keys: Iterable[str], threads: int = 8) -> None:
        """Flush blobs written with ``sync=False`` to disk, several at a time."""

        def one(key: str) -> None:
            fd = os.open(self._path(key), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, keys))

    def delete(self, key: str) -> None:
        """Remove a blob (no error when it is already gone)."""
        self._path(key).unlink(missing_ok=True)

    def get(self, key: str, sha256: str | None = None) -> bytes:
        """Read a blob; when ``sha256`` is given the content must match it."""
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise BlobMissing(key) from exc
        if sha256 is not None and sha256_hex(data) != sha256:
            raise BlobMissing(f"{key}: checksum mismatch")
        return data

    def path(self, key: str) -> Path:
        """Local path of an existing blob (for streaming responses)."""
        path = self._path(key)
        if not path.is_file():
            raise BlobMissing(key)
        return path

    def exists(self, key: str) -> bool:
        """Whether a blob exists."""
        return self._path(key).is_file()

    def check(self) -> None:
        """Raise if the store is not writable (readiness probe)."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".ready"
        probe.write_bytes(b"ok")
        probe.unlink()
