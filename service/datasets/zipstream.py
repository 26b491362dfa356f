"""A zip writer for streaming: members go to a sink as they are written, in constant memory.

:mod:`zipfile` keeps one ``ZipInfo`` per member until it writes the central directory, so its
memory grows with the archive. Here each member's central-directory record is appended to a
temporary file as the member is written, and copied out at the end. Sizes and CRCs are known
before each local header is written (small members in memory, large ones compressed to a
temporary file first), so there are no data descriptors: any unzip tool reads the result.
ZIP64 records are used where sizes, offsets or the member count need them.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO

_U32 = 0xFFFFFFFF
_U16 = 0xFFFF
_CHUNK = 1 << 16
_UTF8 = 0x0800


def _dos_time(t: float) -> tuple[int, int]:
    lt = time.localtime(t)
    year = max(lt.tm_year, 1980)
    return ((lt.tm_hour << 11) | (lt.tm_min << 5) | (lt.tm_sec // 2),
            ((year - 1980) << 9) | (lt.tm_mon << 5) | lt.tm_mday)


class ZipOut:
    """Write a zip archive to ``sink`` (called with chunks of about 64 KiB) member by member.

    ``spool(name)`` gives a temporary file for a member that is built up over the whole export
    (a JSON list, a CSV); spooled members are written, in creation order, by ``flush_spools``
    or ``close``. Member names are the caller's to keep unique (nothing is kept per member).
    """

    def __init__(self, sink: Callable[[bytes], None], tmp_dir: Path | None = None) -> None:
        self._sink = sink
        self._buf = bytearray()
        self._offset = 0
        self._count = 0
        self._tmp_dir = str(tmp_dir) if tmp_dir else None
        self._central = tempfile.TemporaryFile(dir=self._tmp_dir)  # noqa: SIM115
        self._spools: dict[str, IO[bytes]] = {}
        self._time, self._date = _dos_time(time.time())
        self.closed = False

    # -- members -----------------------------------------------------------------------------

    def add_bytes(self, name: str, data: bytes, compress: bool = True) -> None:
        """A member from bytes in memory."""
        crc = zlib.crc32(data)
        body = _deflate(data) if compress else data
        self._member(name, crc, len(data), len(body), compress, [body])

    def add_file(self, name: str, path: Path, compress: bool = False) -> None:
        """A member from a file (images: stored, they are compressed already)."""
        self.add_bytes(name, path.read_bytes(), compress)

    def add_parts(self, name: str, parts: list[bytes | IO[bytes]]) -> None:
        """A compressed member made of byte strings and open files, in order (any size)."""
        with tempfile.TemporaryFile(dir=self._tmp_dir) as joined:
            for part in parts:
                if isinstance(part, bytes | bytearray):
                    joined.write(part)
                else:
                    part.seek(0)
                    shutil.copyfileobj(part, joined, _CHUNK)
            self._add_large(name, joined)

    def spool(self, name: str) -> IO[bytes]:
        """The temporary file that becomes member ``name`` at the end."""
        fh = self._spools.get(name)
        if fh is None:
            fh = self._spools[name] = tempfile.TemporaryFile(dir=self._tmp_dir)  # noqa: SIM115
        return fh

    def flush_spools(self) -> None:
        """Write the spooled members (in the order they were created) and drop them."""
        for name, fh in self._spools.items():
            self._add_large(name, fh)
            fh.close()
        self._spools.clear()

    def close(self) -> None:
        """Spooled members, the central directory, the end records; then the last bytes."""
        if self.closed:
            return
        self.flush_spools()
        start, size = self._offset, self._central.tell()
        self._central.seek(0)
        while chunk := self._central.read(_CHUNK):
            self._write(chunk)
        self._central.close()
        self._end_records(start, size)
        self._send(force=True)
        self.closed = True

    def abort(self) -> None:
        """Release temporary files without finishing the archive."""
        for fh in self._spools.values():
            fh.close()
        self._spools.clear()
        self._central.close()
        self.closed = True

    # -- internals ---------------------------------------------------------------------------

    def _add_large(self, name: str, src: IO[bytes]) -> None:
        src.seek(0)
        crc, size = 0, 0
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        with tempfile.TemporaryFile(dir=self._tmp_dir) as packed:
            while chunk := src.read(_CHUNK):
                crc, size = zlib.crc32(chunk, crc), size + len(chunk)
                packed.write(packer.compress(chunk))
            packed.write(packer.flush())
            csize = packed.tell()
            packed.seek(0)
            self._member(name, crc, size, csize, True, iter(lambda: packed.read(_CHUNK), b""))

    def _member(self, name: str, crc: int, size: int, csize: int, compress: bool,
                chunks: object) -> None:
        raw = name.encode()
        method = 8 if compress else 0
        offset = self._offset
        zip64 = size >= _U32 or csize >= _U32
        local_extra = struct.pack("<HHQQ", 1, 16, size, csize) if zip64 else b""
        version = 45 if zip64 else 20
        self._write(struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, _UTF8, method, self._time, self._date, crc,
            _U32 if zip64 else csize, _U32 if zip64 else size, len(raw), len(local_extra)))
        self._write(raw + local_extra)
        for chunk in chunks:  # type: ignore[attr-defined]
            self._write(chunk)
        # the central record, with ZIP64 fields for whatever does not fit in 32 bits
        fields = [v for v, big in ((size, size >= _U32), (csize, csize >= _U32),
                                   (offset, offset >= _U32)) if big]
        extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields) if fields else b""
        version = 45 if fields else 20
        self._central.write(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, (3 << 8) | version, version, _UTF8, method,
            self._time, self._date, crc, min(csize, _U32), min(size, _U32), len(raw),
            len(extra), 0, 0, 0, 0o100644 << 16, min(offset, _U32)))
        self._central.write(raw + extra)
        self._count += 1

    def _end_records(self, start: int, size: int) -> None:
        count = self._count
        if count >= _U16 or start >= _U32 or size >= _U32:
            zip64_end = self._offset
            self._write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, (3 << 8) | 45, 45, 0, 0,
                                    count, count, size, start))
            self._write(struct.pack("<IIQI", 0x07064B50, 0, zip64_end, 1))
        self._write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(count, _U16),
                                min(count, _U16), min(size, _U32), min(start, _U32), 0))

    def _write(self, data: bytes) -> None:
        self._buf += data
        self._offset += len(data)
        if len(self._buf) >= _CHUNK:
            self._send()

    def _send(self, force: bool = False) -> None:
        if self._buf and (force or len(self._buf) >= _CHUNK):
            self._sink(bytes(self._buf))
            self._buf.clear()


def _deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush()
