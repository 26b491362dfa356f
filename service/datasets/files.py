"""Finding a dataset's files: image files by relative path or by name, annotation files."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
_LS_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")  # Label Studio prefixes uploaded file names


def _skipped(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def walk_files(root: Path) -> Iterator[Path]:
    """Regular files below ``root`` in a stable order (no links followed, no hidden files)."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        for name in sorted(files):
            path = Path(folder) / name
            if not _skipped(name) and not path.is_symlink() and path.is_file():
                yield path


def is_image(path: Path | str) -> bool:
    return PurePosixPath(str(path)).suffix.lower() in IMAGE_EXTENSIONS


class FileIndex:
    """The files of a dataset folder, to resolve the image references annotation files hold."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.files = list(walk_files(self.root))
        self.images = [p for p in self.files if is_image(p)]
        self._by_rel = {self.rel(p): p for p in self.images}
        self._by_name: dict[str, list[Path]] = {}
        for p in self.images:
            self._by_name.setdefault(p.name.lower(), []).append(p)
        self.used: set[Path] = set()

    def rel(self, path: Path) -> str:
        """The path relative to the dataset root, POSIX style."""
        return path.relative_to(self.root).as_posix()

    def with_suffix(self, *suffixes: str) -> list[Path]:
        """Files whose name ends with one of ``suffixes`` (case-insensitive)."""
        return [p for p in self.files if p.name.lower().endswith(suffixes)]

    def resolve(self, ref: str, near: Path | None = None) -> tuple[Path | None, str | None]:
        """The image a reference names, or (None, why): tried relative to ``near`` (the
        annotation file's folder), to the root, then by file name when that is unique."""
        clean = ref.replace("\\", "/").split("?", 1)[0]
        if "d=" in ref and "/data/local-files/" in ref:  # Label Studio local files
            clean = ref.split("d=", 1)[1]
        candidates = []
        rel = clean.lstrip("/")
        if near is not None and rel:
            candidates.append(near / rel)
        if rel:
            candidates.append(self.root / rel)
        for cand in candidates:
            try:
                key = self.rel(cand.resolve())
            except ValueError:
                continue
            if key in self._by_rel:
                return self._mark(self._by_rel[key])
        name = PurePosixPath(clean).name
        for option in dict.fromkeys((name, _LS_UPLOAD_PREFIX.sub("", name))):
            found = self._by_name.get(option.lower(), [])
            if len(found) == 1:
                return self._mark(found[0])
            if len(found) > 1:
                return None, f"{len(found)} files in the dataset are named {option!r}"
        return None, None

    def _mark(self, path: Path) -> tuple[Path, None]:
        self.used.add(path)
        return path, None

    def unused_images(self) -> list[Path]:
        """Images no annotation referred to (imported without a label)."""
        return [p for p in self.images if p not in self.used]
