"""Zip and tar archives from outside: checked member by member before anything is written.

Refused (nothing extracted): names with ``..``, absolute or drive paths, symbolic and hard
links, devices and other special files, duplicate members, declared sizes over the per-member
or total limits, too many members, encrypted or corrupt archives. Extraction writes regular
files only, below the destination, never more bytes than a member declared, and leaves
nothing behind when it refuses.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from service.datasets.items import ImportFailed
from service.settings import Settings

_DRIVE = re.compile(r"^[A-Za-z]:")
_COMPRESSED_TAR = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveLimits:
    """How much one archive may hold (as its members declare)."""

    max_files: int
    max_total_bytes: int
    max_member_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ArchiveLimits:
        return cls(settings.max_import_files, settings.max_import_uncompressed_bytes,
                   settings.max_import_member_bytes)


def archive_kind(head: bytes) -> str | None:
    """``zip`` or ``tar`` (plain, gzip, bzip2 or xz) from the first 512 bytes, else None."""
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head.startswith(_COMPRESSED_TAR) or head[257:262] == b"ustar":
        return "tar"
    return None


def safe_name(name: str) -> str:
    """The member's relative POSIX path, or ImportFailed ``archive_unsafe_path``."""
    clean = name.replace("\\", "/")
    if "\x00" in clean or clean.startswith("/") or _DRIVE.match(clean):
        raise _unsafe(name)
    parts = [p for p in PurePosixPath(clean).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _unsafe(name)
    return "/".join(parts)


def _unsafe(name: str) -> ImportFailed:
    return ImportFailed("archive_unsafe_path",
                        f"archive member {name[:200]!r} points outside the archive "
                        "(absolute path or '..')")


class _Tally:
    """Counts members and declared bytes against the limits."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits, self.files, self.total = limits, 0, 0
        self.names: set[str] = set()

    def member(self, name: str, size: int, is_dir: bool) -> str:
        path = safe_name(name)
        self.files += 1
        if self.files > self.limits.max_files:
            raise ImportFailed("archive_too_many_files",
                               f"the archive holds more than {self.limits.max_files} members",
                               413)
        if is_dir or not path:
            return path
        if path in self.names:
            raise ImportFailed("archive_duplicate_member",
                               f"archive member {path[:200]!r} appears twice")
        self.names.add(path)
        if size < 0 or size > self.limits.max_member_bytes:
            raise ImportFailed("archive_member_too_large",
                               f"archive member {path[:200]!r} declares {size} bytes; the "
                               f"limit is {self.limits.max_member_bytes}", 413)
        self.total += size
        if self.total > self.limits.max_total_bytes:
            raise ImportFailed("archive_too_large",
                               "the archive's members declare more than "
                               f"{self.limits.max_total_bytes} bytes uncompressed", 413)
        return path


def _link(name: str) -> ImportFailed:
    return ImportFailed("archive_link", f"archive member {name[:200]!r} is a link; links are "
                        "not accepted")


def _special(name: str) -> ImportFailed:
    return ImportFailed("archive_special_file",
                        f"archive member {name[:200]!r} is not a regular file or folder")


def _zip_members(zf: zipfile.ZipFile, limits: ArchiveLimits) -> Iterator[tuple[zipfile.ZipInfo,
                                                                                str]]:
    infos = zf.infolist()
    if len(infos) > limits.max_files:
        raise ImportFailed("archive_too_many_files",
                           f"the archive holds {len(infos)} members; the limit is "
                           f"{limits.max_files}", 413)
    tally = _Tally(limits)
    checked = []
    for info in infos:
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if info.create_system == 3 and kind == stat.S_IFLNK:
            raise _link(info.filename)
        if info.create_system == 3 and kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise _special(info.filename)
        if info.flag_bits & 0x1:
            raise ImportFailed("archive_invalid",
                               f"archive member {info.filename[:200]!r} is encrypted")
        checked.append((info, tally.member(info.filename, info.file_size, info.is_dir())))
    yield from checked  # every member is checked before the first is used


def _tar_check(member: tarfile.TarInfo, tally: _Tally) -> str:
    if member.issym() or member.islnk():
        raise _link(member.name)
    if not (member.isreg() or member.isdir()):
        raise _special(member.name)
    return tally.member(member.name, member.size, member.isdir())


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except ImportFailed:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ImportFailed("archive_invalid",
                           f"the archive is corrupt or truncated ({exc.__class__.__name__})"
                           ) from exc
    except Exception as exc:  # zlib, lzma and bz2 errors have no common base
        raise ImportFailed("archive_invalid",
                           f"the archive cannot be read ({exc.__class__.__name__})") from exc


def check_archive(src: BinaryIO, limits: ArchiveLimits) -> str:
    """Check every member of an archive without extracting; returns its kind (zip, tar).

    A zip is checked from its central directory; a tar is read through once (headers only
    are kept). Raises ImportFailed with a stable code.
    """
    src.seek(0)
    kind = archive_kind(src.read(512))
    src.seek(0)
    if kind is None:
        raise ImportFailed("unsupported_archive", "the upload is not a zip or tar archive", 415)
    with _errors():
        if kind == "zip":
            with zipfile.ZipFile(src) as zf:
                for _ in _zip_members(zf, limits):
                    pass
        else:
            tally = _Tally(limits)
            with tarfile.open(fileobj=src, mode="r|*") as tf:
                for member in tf:
                    _tar_check(member, tally)
    src.seek(0)
    return kind


def _copy(src: BinaryIO, dest: Path, declared: int) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with dest.open("xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > declared:
                raise ImportFailed("archive_invalid",
                                   f"archive member {dest.name!r} holds more than it declares")
            out.write(chunk)


def extract_archive(path: Path, dest: Path, limits: ArchiveLimits) -> int:
    """Check and extract an archive into the new folder ``dest``; returns the files written.

    A zip is checked whole before the first member is written; a tar is checked member by
    member as it streams, and on a refusal everything written so far is removed.
    """
    dest = dest.resolve()
    dest.mkdir(parents=True, exist_ok=False)
    try:
        return _extract(path, dest, limits)
    except BaseException:
        for child in dest.iterdir():
            remove_tree(child) if child.is_dir() else child.unlink(missing_ok=True)
        raise


def _extract(path: Path, dest: Path, limits: ArchiveLimits) -> int:
    with path.open("rb") as fh:
        kind = archive_kind(fh.read(512))
    if kind is None:
        raise ImportFailed("unsupported_archive", f"{path.name} is not a zip or tar archive", 415)
    files = 0
    with _errors():
        if kind == "zip":
            with zipfile.ZipFile(path) as zf:
                for info, name in _zip_members(zf, limits):
                    if name and not info.is_dir():
                        with zf.open(info) as member:
                            _copy(member, _target(dest, name), info.file_size)  # type: ignore[arg-type]
                        files += 1
        else:
            tally = _Tally(limits)
            with tarfile.open(path, mode="r|*") as tf:
                for member in tf:
                    name = _tar_check(member, tally)
                    if name and member.isreg():
                        data = tf.extractfile(member)
                        assert data is not None
                        _copy(data, _target(dest, name), member.size)  # type: ignore[arg-type]
                        files += 1
    return files


def _target(dest: Path, name: str) -> Path:
    target = (dest / name).resolve()
    if dest not in target.parents:
        raise _unsafe(name)
    return target


def remove_tree(path: Path) -> None:
    """Delete an extraction folder (ignoring what is already gone)."""
    shutil.rmtree(path, ignore_errors=True)
