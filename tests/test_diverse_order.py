"""``order=diverse``: the k-center greedy weighted by uncertainty, and the listing on real
card crops embedded by a real worker process."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from models.diversity import diverse_order
from tests.conftest import Api, WorkerProcess, settings_values, worker_stack
from tests.images import card_crops
from tests.test_api import assert_error, make_project, upload
from tests.test_end_to_end import label


def test_greedy_without_scores_is_k_center() -> None:
    a, b, c = np.eye(3, dtype=np.float32)
    near_a = a + np.float32(0.05) * b
    cand = np.stack([a, near_a, b, c])
    # no model: the first in listing order, then always the farthest from those picked
    assert diverse_order(np.full(4, np.nan), cand) == [0, 2, 3, 1]


def test_uncertainty_weights_the_distance() -> None:
    a, b = np.eye(2, dtype=np.float32)
    cand = np.stack([a, a + np.float32(0.01) * b, b])
    # the two most uncertain are near-copies: the second drops behind a less uncertain image
    assert diverse_order(np.array([0.9, 0.85, 0.5]), cand) == [0, 2, 1]
    # with the copies equally far from the rest, plain uncertainty order decides
    assert diverse_order(np.array([0.9, 0.85, 0.5]), np.eye(3)) == [0, 1, 2]


def test_labeled_images_count_as_covered() -> None:
    a, b, c = np.eye(3, dtype=np.float32)
    cand = np.stack([a, b, c])
    # the most uncertain candidate is a copy of a labeled image: it comes last
    order = diverse_order(np.array([0.9, 0.5, 0.4]), cand, labeled=np.stack([a]))
    assert order == [1, 2, 0]
    assert diverse_order(np.array([0.9, 0.5, 0.4]), cand, picks=1, labeled=a[None]) == [1]
    assert diverse_order(np.zeros(0), np.zeros((0, 3))) == []
    with pytest.raises(ValueError, match="weights"):
        diverse_order(np.zeros(2), cand)


@pytest.fixture()
def stack(tmp_path: Path, sqlite_url: str, cache_dir: Path) -> Iterator[tuple[Api, WorkerProcess]]:
    yield from worker_stack(settings_values(tmp_path, sqlite_url, cache_dir))


def recompressed(data: bytes) -> bytes:
    """The same photo saved again at another JPEG quality: new bytes, the same picture."""
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(out, "JPEG", quality=70)
    return out.getvalue()


def listing(api: Api, pid: int, order: str) -> list[int]:
    r = api.get(f"/api/v1/projects/{pid}/images",
                params={"status": "unlabeled", "order": order, "limit": 500})
    assert r.status_code == 200, r.text
    return [i["id"] for i in r.json()["items"]]


def wait_embedded(api: Api, pid: int, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        stats = api.get(f"/api/v1/projects/{pid}/stats").json()
        if stats["embedded"] >= stats["images"]:
            return
        time.sleep(0.3)
    raise AssertionError(f"images not embedded: {stats}\n{worker.tail()}")


@pytest.mark.slow
def test_diverse_listing_puts_near_copies_last(stack: tuple[Api, WorkerProcess]) -> None:
    api, worker = stack
    p = make_project(api, classes=("ace", "king", "nine", "queen"))
    crops = [s for s in card_crops("train", per_class=2)
             if s.labels[0] in ("ace", "king", "nine", "queen")]
    first = crops[0]
    files: list[tuple[str, bytes]] = [(first.name, first.data),
                                      ("copy.jpg", recompressed(first.data))]
    files += [(s.name, s.data) for s in crops[1:]]
    ids = [i["id"] for i in upload(api, p["id"], files).json()["images"]]
    original, copy = ids[0], ids[1]
    assert listing(api, p["id"], "created")[:2] == [original, copy]
    assert_error(api.get(f"/api/v1/projects/{p['id']}/images", params={"order": "diverse"}),
                 422, "order_needs_unlabeled")
    wait_embedded(api, p["id"], worker)

    # no model yet: k-center from the first upload; the near-copy adds least, so it is last
    diverse = listing(api, p["id"], "diverse")
    assert sorted(diverse) == sorted(ids)
    assert diverse[0] == original and diverse[-1] == copy
    # paging walks the same order
    page: dict[str, Any] = api.get(f"/api/v1/projects/{p['id']}/images", params={
        "status": "unlabeled", "order": "diverse", "limit": 3}).json()
    rest = api.get(f"/api/v1/projects/{p['id']}/images", params={
        "status": "unlabeled", "order": "diverse", "limit": 500,
        "cursor": page["next_cursor"]}).json()
    assert [i["id"] for i in page["items"] + rest["items"]] == diverse

    # once the original is labeled it counts as covered: its copy stays last
    label(api, original, [first.labels[0]])
    after = listing(api, p["id"], "diverse")
    assert original not in after and after[-1] == copy and after[0] != copy
