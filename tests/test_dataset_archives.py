"""Archive safety, the streaming zip writer and the format readers' edge cases (no database)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from service.datasets.archive import ArchiveLimits, check_archive, extract_archive, safe_name
from service.datasets.exporter import parse_split, split_of
from service.datasets.files import FileIndex
from service.datasets.items import ImportFailed
from service.datasets.labelstudio import read_labelstudio
from service.datasets.yolo import read_yolo
from service.datasets.zipstream import ZipOut
from tests.images import jpeg

LIMITS = ArchiveLimits(max_files=100, max_total_bytes=10_000_000, max_member_bytes=5_000_000)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


def declared_size_zip(size: int) -> bytes:
    """A small zip whose central directory declares ``size`` bytes uncompressed."""
    data = bytearray(zip_bytes({"bomb.bin": b"\0" * 1000}))
    at = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, at + 24, size)
    return bytes(data)


def tar_bytes(add: list[tarfile.TarInfo], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:  # type: ignore[call-overload]
        for info in add:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return buf.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 1,
               link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return info


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/etc/passwd",
                                  "C:/windows/x.txt", "..\\evil.txt", "a\x00b"])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(ImportFailed) as err:
        safe_name(name)
    assert err.value.code == "archive_unsafe_path"


def test_safe_names_are_normalized() -> None:
    assert safe_name("./a//b/./c.jpg") == "a/b/c.jpg"
    assert safe_name("dir\\x.jpg") == "dir/x.jpg"


@pytest.mark.parametrize("data, code", [
    (zip_bytes({"../evil.txt": b"x"}), "archive_unsafe_path"),
    (zip_bytes({"/abs/evil.txt": b"x"}), "archive_unsafe_path"),
    (symlink_zip(), "archive_link"),
    (declared_size_zip(4_000_000_000), "archive_member_too_large"),
    (zip_bytes({f"f{i}": b"x" for i in range(101)}), "archive_too_many_files"),
    (zip_bytes({f"f{i}": b"\0" * 4_000_000 for i in range(3)}), "archive_too_large"),
    (zip_bytes({"a": b"x"})[:-30], "archive_invalid"),
    (b"just some text, no archive", "unsupported_archive"),
    (tar_bytes([tar_member("../evil.txt")]), "archive_unsafe_path"),
    (tar_bytes([tar_member("/etc/evil")]), "archive_unsafe_path"),
    (tar_bytes([tar_member("link", tarfile.SYMTYPE, link="/etc/passwd")]), "archive_link"),
    (tar_bytes([tar_member("a"), tar_member("hard", tarfile.LNKTYPE, link="a")]),
     "archive_link"),
    (tar_bytes([tar_member("dev", tarfile.CHRTYPE)]), "archive_special_file"),
    (tar_bytes([tar_member("big", size=6_000_000)], mode="w"), "archive_member_too_large"),
])
def test_hostile_archives_are_refused_before_extraction(tmp_path: Path, data: bytes,
                                                        code: str) -> None:
    with pytest.raises(ImportFailed) as err:
        check_archive(io.BytesIO(data), LIMITS)
    assert err.value.code == code
    path = tmp_path / "a.bin"
    path.write_bytes(data)
    with pytest.raises(ImportFailed) as err:
        extract_archive(path, tmp_path / "out", LIMITS)
    assert err.value.code == code
    assert not list((tmp_path / "out").rglob("*"))  # nothing was written
    assert not (tmp_path / "evil.txt").exists()


def test_a_good_archive_extracts(tmp_path: Path) -> None:
    data = zip_bytes({"a/b.jpg": jpeg(), "c.txt": b"hello", "d/": b""})
    assert check_archive(io.BytesIO(data), LIMITS) == "zip"
    path = tmp_path / "a.zip"
    path.write_bytes(data)
    assert extract_archive(path, tmp_path / "out", LIMITS) == 2
    assert (tmp_path / "out" / "c.txt").read_bytes() == b"hello"
    tgz = tmp_path / "a.tgz"
    tgz.write_bytes(tar_bytes([tar_member("x/y.txt", size=3)]))
    assert extract_archive(tgz, tmp_path / "out2", LIMITS) == 1


def test_zip_writer_output_reads_everywhere() -> None:
    out = io.BytesIO()
    z = ZipOut(out.write)
    z.add_bytes("a/é.txt", "héllo".encode() * 100)
    z.add_bytes("img.jpg", jpeg(), compress=False)
    z.spool("big.json").write(b"[" + b"1," * 100_000 + b"1]")
    z.add_parts("parts.json", [b"[", io.BytesIO(b"1,2"), b"]"])
    z.close()
    zf = zipfile.ZipFile(io.BytesIO(out.getvalue()))
    assert zf.testzip() is None
    assert zf.read("a/é.txt") == "héllo".encode() * 100
    assert json.loads(zf.read("parts.json")) == [1, 2]
    assert len(json.loads(zf.read("big.json"))) == 100_001


def test_zip_writer_uses_zip64_for_many_members() -> None:
    out = io.BytesIO()
    z = ZipOut(out.write)
    for i in range(70_000):
        z.add_bytes(f"f{i}", b"", compress=False)
    z.close()
    zf = zipfile.ZipFile(io.BytesIO(out.getvalue()))
    assert len(zf.infolist()) == 70_000


def test_split_is_reproducible_and_stable() -> None:
    fractions = parse_split("80,10,10")
    assert fractions == pytest.approx((0.8, 0.1, 0.1))
    shas = [f"{i:064x}" for i in range(3000)]
    first = [split_of(s, 7, fractions) for s in shas]
    assert first == [split_of(s, 7, fractions) for s in shas]  # same seed, same split
    assert first != [split_of(s, 8, fractions) for s in shas]
    assert first[:100] == [split_of(s, 7, fractions) for s in shas[:100]]  # stable subset
    share = first.count("train") / len(first)
    assert 0.77 < share < 0.83 and first.count("val") > 0 and first.count("test") > 0
    for bad in ("80,20", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(ValueError):
            parse_split(bad)


def test_yolo_lines_are_checked_one_by_one(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg())
    (tmp_path / "images" / "b.jpg").write_bytes(jpeg(color=(1, 2, 3)))
    (tmp_path / "images" / "c.jpg").write_bytes(jpeg(color=(9, 2, 3)))
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "labels" / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\nfoo\n1 0.1 0.1 0.3 0.1 0.3 0.3\n1 .5 .5 .1 .1 .9\n")
    (tmp_path / "labels" / "b.txt").write_text("")
    items = {i.image_ref: i for i in read_yolo(FileIndex(tmp_path))}
    a = items["images/a.jpg"]
    assert [(b.index, b.label, b.polygon is not None) for b in a.boxes or []] == [
        (0, "cat", False), (3, "dog", True), (4, "dog", False)]
    assert [(p["object"], p["code"]) for p in a.problems] == [(1, "unknown_class_index"),
                                                             (2, "parse_error")]
    assert items["images/b.jpg"].boxes == []  # empty file: nothing in the image
    assert items["images/c.jpg"].boxes is None  # no file: not labeled


def test_label_studio_reader(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(jpeg())
    rect = {"type": "rectanglelabels", "original_width": 64, "original_height": 48,
            "value": {"x": 10, "y": 20, "width": 50, "height": 25, "rotation": 0,
                      "rectanglelabels": ["cat"]}}
    tasks = [{"id": 1, "data": {"image": "/data/upload/1/abcdef12-x.jpg"},
              "annotations": [
                  {"id": 1, "result": [rect], "was_cancelled": False,
                   "updated_at": "2024-01-01"},
                  {"id": 2, "updated_at": "2024-02-01", "result": [
                      rect, {**rect, "value": {**rect["value"], "rotation": 30}},
                      {"type": "textarea", "value": {"text": ["hi"]}}]},
                  {"id": 3, "was_cancelled": True, "updated_at": "2025-01-01", "result": []}],
              "predictions": [{"result": [rect]}]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    [item] = list(read_labelstudio(FileIndex(tmp_path)))
    assert item.image_path == tmp_path / "x.jpg"
    assert item.declared_size == (64, 48)
    assert [(b.label, b.x, b.y, b.width, b.height) for b in item.boxes or []] == [
        ("cat", 0.1, 0.2, 0.5, 0.25)]
    assert [(p["object"], p["code"]) for p in item.problems] == [(1, "rotated_box"),
                                                                (2, "unsupported_result")]
