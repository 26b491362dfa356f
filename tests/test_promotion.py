"""Promotion decisions on the real database and blob store: never promote a worse model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.detection_data import load_voc_samples
from models.detection_eval import image_matches
from models.detection_types import Detections
from models.heads import predict_proba, train_head
from models.onnx_export import build_head_onnx
from service.db import sessionmaker_for
from service.migrate import upgrade
from service.settings import Settings
from service.storage import LocalBlobStore, sha256_hex
from service.tables import ModelVersion, Project, TrainingRun
from tests.conftest import DATASETS
from workers.context import WorkerContext
from workers.detection import lower_map_share
from workers.evaluation import (
    REFUSE_SHARE,
    Candidate,
    assign_folds,
    compare_with_promoted,
    worse_share,
)
from workers.labeled import LabeledSet

CLASSES = ["a", "b", "c"]


def toy_set(n: int = 60, seed: int = 0) -> LabeledSet:
    """Three separable clusters in embedding space (real-valued, like embeddings)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centers = rng.normal(size=(3, 1280)).astype(np.float32) * 3
    x = centers[y] + rng.normal(size=(n, 1280)).astype(np.float32)
    shas = [f"{rng.integers(0, 2**32):08x}" + "0" * 56 for _ in range(n)]
    return LabeledSet(list(range(1, n + 1)), shas, x, y)


def test_head_rows_add_each_images_views() -> None:
    data = toy_set(6)
    assert all(np.array_equal(a, b) for a, b in zip(data.head_rows(), (data.x, data.y),
                                                   strict=True))
    views = np.stack([data.x + 1, data.x + 2])  # [V, N, D]
    data.views = views
    x, y = data.head_rows(np.array([4, 1]))
    # the rows themselves, then each view of them, in the same order
    np.testing.assert_array_equal(x, np.concatenate([data.x[[4, 1]], views[0, [4, 1]],
                                                     views[1, [4, 1]]]))
    np.testing.assert_array_equal(y, np.tile(data.y[[4, 1]], 3))


def test_predict_averages_over_the_loaded_prediction_views() -> None:
    data = toy_set(12)
    params = train_head(data.x, data.y, "multiclass", 3, torch.device("cpu"))
    rows = np.array([5, 0, 7])
    np.testing.assert_allclose(data.predict(params, rows), predict_proba(params, data.x[rows]),
                               atol=1e-6)  # no views loaded: the image's own prediction
    # views that look like other images (of other classes): the average must move
    data.predict_views = np.stack([np.roll(data.x, 1, axis=0), np.roll(data.x, 2, axis=0)])
    data.predict_view_names = ("mirror", "turn+15")
    own, *views = (predict_proba(params, x[rows]) for x in (data.x, *data.predict_views))
    np.testing.assert_allclose(data.predict(params, rows), (own + views[0] + views[1]) / 3,
                               atol=1e-6)
    # a promoted model is judged with only the views it serves with
    np.testing.assert_allclose(
        data.average(lambda x: predict_proba(params, x), rows, ["turn+15"]),
        (own + views[1]) / 2, atol=1e-6)
    assert not np.allclose(data.predict(params, rows), own, atol=1e-3)


@pytest.fixture
def ctx(tmp_path: Path, sqlite_url: str) -> WorkerContext:
    upgrade(sqlite_url)
    settings = Settings(data_dir=tmp_path, database_url=sqlite_url, device="cpu")
    return WorkerContext(settings=settings, sessions=sessionmaker_for(sqlite_url),
                         blobs=LocalBlobStore(settings.blob_dir))


def promoted_row(ctx: WorkerContext, data: LabeledSet, trained_on: np.ndarray) -> ModelVersion:
    import torch

    params = train_head(data.x[trained_on], data.y[trained_on], "multiclass", 3,
                        torch.device("cpu"))
    head = build_head_onnx(params.weight, params.bias, "softmax")
    ctx.blobs.put("models/p1/run1/head.onnx", head)
    with ctx.sessions.begin() as s:
        p = Project(name="p", task="multiclass")
        s.add(p)
        s.flush()
        run = TrainingRun(project_id=p.id, trigger="auto", status="SUCCEEDED")
        s.add(run)
        s.flush()
        row = ModelVersion(
            project_id=p.id, run_id=run.id, version=1, task="multiclass", classes=CLASSES,
            backbone=ctx.backbone, kind="frozen_linear", device="cpu",
            head_key="models/p1/run1/head.onnx", head_sha256=sha256_hex(head),
            pipeline_key="models/p1/run1/pipeline.onnx", pipeline_sha256="0" * 64,
            thresholds=[0.5] * 3, metrics={}, promoted=True,
            train_image_ids=[data.image_ids[i] for i in trained_on])
        s.add(row)
    return row


def test_worse_candidate_is_kept_unpromoted(ctx: WorkerContext) -> None:
    import torch

    data = toy_set()
    current = promoted_row(ctx, data, np.arange(30))
    params = train_head(data.x, data.y, "multiclass", 3, torch.device("cpu"))
    rows = np.arange(30, 60)  # never seen by the promoted model
    good = Candidate("frozen_linear", params, np.arange(60), rows,
                     predict_proba(params, data.x[rows]))
    with ctx.sessions() as session:
        ok, note = compare_with_promoted(ctx, session, current, "multiclass", CLASSES, data, good)
        assert ok and note.startswith("not worse"), note
        wrong = np.roll(np.eye(3, dtype=np.float32)[data.y[rows]], 1, axis=1)  # always wrong
        bad = Candidate("frozen_linear", params, np.arange(60), rows, wrong)
        ok, note = compare_with_promoted(ctx, session, current, "multiclass", CLASSES, data, bad)
        assert not ok and "worse" in note and "30 labeled images" in note, note
        assert "lower in 100% of paired resamples" in note
        # one miss more than the promoted model on 30 images is within noise: promoted
        one_miss = np.eye(3, dtype=np.float32)[data.y[rows]]
        one_miss[0] = np.roll(one_miss[0], 1)
        close = Candidate("frozen_linear", params, np.arange(60), rows, one_miss)
        ok, note = compare_with_promoted(ctx, session, current, "multiclass", CLASSES, data,
                                         close)
        assert ok and note.startswith("promoted, lower within noise") and "0.9667" in note, note
        # images the promoted model trained on are never used to judge it
        seen_only = Candidate("frozen_linear", params, np.arange(60), np.arange(30),
                              wrong[:30])
        ok, note = compare_with_promoted(ctx, session, current, "multiclass", CLASSES, data,
                                         seen_only)
        assert ok and "unseen" in note


def test_folds_are_stable_and_stratified() -> None:
    data = toy_set(31)
    folds, k = assign_folds(data, "multiclass")
    assert k == 5
    for c in range(3):
        counts = np.bincount(folds[data.y == c], minlength=k)
        assert counts.max() - counts.min() <= 1  # every fold holds each class
    again, _ = assign_folds(data, "multiclass")
    assert (again == folds).all()
    tiny = LabeledSet(data.image_ids[:4], data.sha256[:4], data.x[:4], np.array([0, 0, 0, 1]))
    assert assign_folds(tiny, "multiclass")[1] == 0  # a class with one label: no CV


def test_worse_share_is_paired_bootstrap() -> None:
    rng = np.random.default_rng(1)
    y = np.arange(40) % 4
    right = np.eye(4)[y] * 0.7 + 0.075
    wrong = np.roll(right, 1, axis=1)
    assert worse_share("multiclass", y, wrong, right) == 1.0
    assert worse_share("multiclass", y, right, wrong) == 0.0
    assert worse_share("multiclass", y, right, right) == 0.0  # a tie is not lower
    tags = (rng.random((40, 5)) < 0.4).astype(int)
    good, noise = tags * 0.8 + 0.1, rng.random((40, 5))
    assert worse_share("multilabel", tags, noise, good) == 1.0
    assert worse_share("multilabel", tags, good, noise) == 0.0


def test_lower_detector_map_is_refused_only_beyond_noise() -> None:
    root = DATASETS / "bccd"
    ids = (root / "ImageSets" / "Main" / "val.txt").read_text().split()[:20]
    samples, _ = load_voc_samples([root / "Annotations" / f"{i}.xml" for i in ids],
                                  ("RBC", "WBC", "Platelets"))

    def found(drop: float) -> list:
        rng = np.random.default_rng(0)
        out = []
        for s in samples:
            keep = rng.random(len(s.boxes)) >= drop
            out.append(Detections(s.boxes[keep], np.ones(int(keep.sum()), np.float32),
                                  s.labels[keep]))
        return image_matches(out, samples, 3)

    perfect = found(0.0)
    # one lost box in 20 images: a lower mAP@.5, but not in every resample
    first = samples[0]
    one_lost = image_matches([Detections(first.boxes[1:], np.ones(len(first.boxes) - 1,
                                                                   np.float32), first.labels[1:]),
                              *[Detections(s.boxes, np.ones(len(s.boxes), np.float32), s.labels)
                                for s in samples[1:]]], samples, 3)
    share = lower_map_share(one_lost, perfect, len(samples))
    assert 0.0 < share < REFUSE_SHARE
    # half the boxes lost everywhere: lower in every resample
    assert lower_map_share(found(0.5), perfect, len(samples)) == 1.0
    assert lower_map_share(perfect, found(0.5), len(samples)) == 0.0
    assert lower_map_share(perfect, perfect, len(samples)) == 0.0  # a tie is not lower
