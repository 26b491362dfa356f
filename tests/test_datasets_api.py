"""Dataset import and export through the API, on SQLite and PostgreSQL, with real data.

Import jobs are run here the way the worker runs them (``run_job``); the worker itself is
exercised in ``test_import_worker.py``.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sqlalchemy import func, select

from service.datasets.jobs import run_job
from service.storage import sha256_hex
from service.tables import Annotation, Image, ImportJob, ProjectClass
from tests.conftest import DATASETS, Api
from tests.images import jpeg
from tests.test_api import assert_error, make_project, upload

BCCD = DATASETS / "bccd"
# the two files with a zero-area box, and a few ordinary ones
BCCD_SUBSET = ["BloodImage_00338", "BloodImage_00343", "BloodImage_00001", "BloodImage_00005",
               "BloodImage_00010", "BloodImage_00020", "BloodImage_00030", "BloodImage_00040"]


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def bccd_voc_zip(names: list[str] = BCCD_SUBSET) -> bytes:
    members = {}
    for name in names:
        members[f"VOC/Annotations/{name}.xml"] = (BCCD / "Annotations" / f"{name}.xml").read_bytes()
        members[f"VOC/JPEGImages/{name}.jpg"] = (BCCD / "JPEGImages" / f"{name}.jpg").read_bytes()
    return zip_of(members)


def run_imports(api: Api) -> None:
    """Run every queued import job in-process, as the worker task does."""
    ctx = api.client.app.state.ctx  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        ids = list(session.scalars(select(ImportJob.id).where(ImportJob.status == "QUEUED")))
    for jid in ids:
        run_job(ctx.sessions, ctx.blobs, ctx.settings, None, jid)


def start_import(api: Api, pid: int, data: bytes, fmt: str, role: str = "operator",
                 name: str = "data.zip", **form: Any) -> Any:
    return api.post(f"/api/v1/projects/{pid}/imports", role=role,
                    files={"file": (name, data, "application/zip")},
                    data={"format": fmt, **form})


def do_import(api: Api, pid: int, data: bytes, fmt: str, **form: Any) -> dict[str, Any]:
    """Upload, run, and return the finished job."""
    r = start_import(api, pid, data, fmt, **form)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "QUEUED" and job["progress"] == 0
    run_imports(api)
    done = api.get(f"/api/v1/imports/{job['id']}", role="annotator").json()
    assert done["status"] == "SUCCEEDED", done
    assert done["progress"] == 1.0
    return done


def export(api: Api, pid: int, fmt: str, **params: Any) -> bytes:
    with api.client.stream("GET", f"/api/v1/projects/{pid}/export", headers=api.h("annotator"),
                           params={"format": fmt, **params}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"] == "application/zip"
        assert "content-length" not in r.headers  # streamed, not built in memory first
        return b"".join(r.iter_bytes())


def labels_by_sha(api: Api, pid: int) -> dict[str, dict[str, Any]]:
    """Every labeled image's current label, keyed by content."""
    ctx = api.client.app.state.ctx  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        rows = session.execute(select(Image.sha256, Annotation.tags, Annotation.boxes,
                                      Annotation.import_format, Image.width, Image.height)
                               .join(Annotation, Annotation.image_id == Image.id)
                               .where(Image.project_id == pid, Annotation.is_current.is_(True)))
        return {sha: {"tags": sorted(tags), "boxes": boxes, "import_format": fmt,
                      "size": (w, h)} for sha, tags, boxes, fmt, w, h in rows}


def same_boxes(a: list[dict[str, Any]], b: list[dict[str, Any]], tol: float = 0.5) -> bool:
    key = lambda box: (box["label"], round(box["x"]), round(box["y"]))  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    return len(a) == len(b) and all(
        x["label"] == y["label"]
        and all(abs(x[k] - y[k]) <= tol for k in ("x", "y", "width", "height"))
        for x, y in zip(a, b, strict=True))


def count(api: Api, table: Any, pid: int) -> int:
    ctx = api.client.app.state.ctx  # type: ignore[attr-defined]
    with ctx.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(table)
                                  .where(table.project_id == pid)) or 0)


@pytest.fixture
def bccd_project(api: Api) -> tuple[int, dict[str, Any]]:
    """A detection project with the BCCD subset imported from Pascal VOC."""
    pid = make_project(api, task="detection", classes=())["id"]
    return pid, do_import(api, pid, bccd_voc_zip(), "voc")


def test_voc_import_reports_the_zero_area_boxes_and_keeps_the_rest(
        api: Api, bccd_project: tuple[int, dict[str, Any]]) -> None:
    pid, job = bccd_project
    report = job["report"]
    assert report["images"] == {"new": len(BCCD_SUBSET), "existing": 0, "failed": 0}
    assert report["labels"]["created"] == len(BCCD_SUBSET)
    assert set(report["classes_created"]) == {"RBC", "WBC", "Platelets"}
    zero = [p for p in report["problems"] if p["code"] == "zero_area"]
    assert [(p["file"], p["object"]) for p in zero] == [
        ("VOC/Annotations/BloodImage_00338.xml", 12), ("VOC/Annotations/BloodImage_00343.xml", 3)]
    assert all("xmin" in p["message"] and "no area" in p["message"] for p in zero)
    assert report["problem_counts"] == {"zero_area": 2} and report["objects"]["rejected"] == 2
    # every other object of those two images is there
    labels = labels_by_sha(api, pid)
    xml = (BCCD / "Annotations" / "BloodImage_00338.xml").read_text()
    sha338 = next(s for s, lab in labels.items() if len(lab["boxes"]) == xml.count("<object>") - 1)
    assert labels[sha338]["import_format"] == "voc"
    total = sum(len(lab["boxes"]) for lab in labels.values())
    assert total == report["objects"]["imported"]
    # VOC corners are 1-based: <xmin>453 ... <xmax>555 is x 452, width 103
    assert {"label": "RBC", "x": 452.0, "y": 80.0, "width": 103.0, "height": 102.0} in \
        labels[sha338]["boxes"]
    history = api.get(f"/api/v1/projects/{pid}/imports").json()
    assert [h["id"] for h in history] == [job["id"]] and history[0]["report"] is None


def test_reimport_adds_nothing(api: Api, bccd_project: tuple[int, dict[str, Any]]) -> None:
    pid, _ = bccd_project
    before = (count(api, Image, pid), count(api, Annotation, pid))
    again = do_import(api, pid, bccd_voc_zip(), "voc")["report"]
    assert again["images"] == {"new": 0, "existing": len(BCCD_SUBSET), "failed": 0}
    assert again["labels"] == {"created": 0, "unchanged": len(BCCD_SUBSET), "kept": 0,
                               "skipped": 0}
    assert again["classes_created"] == []
    assert (count(api, Image, pid), count(api, Annotation, pid)) == before


@pytest.mark.parametrize("fmt", ["coco", "yolo", "voc", "azureml", "labelstudio"])
def test_round_trip_keeps_every_box(api: Api, bccd_project: tuple[int, dict[str, Any]],
                                    fmt: str) -> None:
    pid, _ = bccd_project
    empty = (BCCD / "JPEGImages" / "BloodImage_00100.jpg").read_bytes()
    iid = upload(api, pid, [("empty.jpg", empty)]).json()["images"][0]["id"]
    r = api.post(f"/api/v1/images/{iid}/annotations", role="annotator", json={"boxes": []})
    assert r.status_code == 201, r.text  # a labeled image with nothing in it
    original = labels_by_sha(api, pid)
    archive = export(api, pid, fmt, split="60,20,20", seed=3)
    other = make_project(api, task="detection", classes=())["id"]
    report = do_import(api, other, archive, fmt)["report"]
    assert report["problems_total"] == 0, report["problems"]
    copy = labels_by_sha(api, other)
    assert copy.keys() == original.keys()
    for sha, label in original.items():
        assert copy[sha]["tags"] == label["tags"]
        assert same_boxes(copy[sha]["boxes"], label["boxes"]), (fmt, sha)
        assert copy[sha]["import_format"] == fmt
    assert copy[sha256_hex(empty)]["boxes"] == []


def test_reconciler_resends_lost_import_jobs(api: Api) -> None:
    from workers.importing import resend_stale_imports

    class Queue:
        def __init__(self) -> None:
            self.sent: list[int] = []

        def send_import(self, sessions: Any, job_id: int) -> bool:
            self.sent.append(job_id)
            return True

    ctx = api.client.app.state.ctx  # type: ignore[attr-defined]
    ctx.queue.send_import = lambda *a: False  # the broker is down at upload time
    pid = make_project(api, task="detection", classes=())["id"]
    job = start_import(api, pid, bccd_voc_zip(BCCD_SUBSET[:1]), "voc").json()
    queue = Queue()
    assert resend_stale_imports(ctx.sessions, queue, ctx.settings) == 1  # type: ignore[arg-type]
    assert queue.sent == [job["id"]]
    assert resend_stale_imports(ctx.sessions, queue, ctx.settings) == 0  # type: ignore[arg-type]
    run_imports(api)
    assert resend_stale_imports(ctx.sessions, queue, ctx.settings) == 0  # type: ignore[arg-type]


def test_coco_export_loads_in_pycocotools(api: Api, tmp_path: Path,
                                          bccd_project: tuple[int, dict[str, Any]]) -> None:
    pid, _ = bccd_project
    with zipfile.ZipFile(io.BytesIO(export(api, pid, "coco"))) as zf:
        zf.extractall(tmp_path)
        names = set(zf.namelist())
    gt = COCO(str(tmp_path / "annotations.json"))
    assert len(gt.getImgIds()) == len(BCCD_SUBSET)
    assert {c["name"] for c in gt.loadCats(gt.getCatIds())} == {"RBC", "WBC", "Platelets"}
    for img in gt.loadImgs(gt.getImgIds()):
        assert f"images/{img['file_name']}" in names
    dets = gt.loadRes([{**a, "score": 1.0} for a in gt.loadAnns(gt.getAnnIds())])
    evaluation = COCOeval(gt, dets, "bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # the labels match themselves exactly


def check_yolo(root: Path) -> int:
    """The checks YOLO trainers apply: data.yaml, a label file per image, 5 normalized fields."""
    data = yaml.safe_load((root / "data.yaml").read_text())
    names = data["names"]
    assert data["nc"] == len(names) and sorted(names) == list(range(len(names)))
    assert "train" in data and "val" in data
    checked = 0
    for folder in {data[k] for k in ("train", "val", "test") if k in data}:
        images = sorted((root / folder).iterdir())
        assert images
        for image in images:  # .../images/... -> .../labels/..., as the trainers map it
            label = root / folder.replace("images", "labels", 1) / f"{image.stem}.txt"
            assert label.is_file(), label
            for line in label.read_text().splitlines():
                fields = line.split()
                assert len(fields) == 5, line
                assert 0 <= int(fields[0]) < data["nc"]
                cx, cy, w, h = map(float, fields[1:])
                assert all(0 <= v <= 1 for v in (cx, cy, w, h)) and w > 0 and h > 0
                assert cx - w / 2 >= -1e-6 and cx + w / 2 <= 1 + 1e-6
                checked += 1
    return checked


def test_yolo_export_passes_a_format_check(api: Api, tmp_path: Path,
                                           bccd_project: tuple[int, dict[str, Any]]) -> None:
    pid, job = bccd_project
    with zipfile.ZipFile(io.BytesIO(export(api, pid, "yolo", split="70,15,15"))) as zf:
        zf.extractall(tmp_path)
    assert check_yolo(tmp_path) == job["report"]["objects"]["imported"]


def test_split_is_reproducible_by_seed(api: Api,
                                       bccd_project: tuple[int, dict[str, Any]]) -> None:
    pid, _ = bccd_project

    def image_sets(seed: int) -> dict[str, bytes]:
        archive = export(api, pid, "voc", split="50,25,25", seed=seed)
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            return {n: zf.read(n) for n in zf.namelist() if n.startswith("ImageSets/")}

    first = image_sets(1)
    assert first == image_sets(1)
    assert sorted(b"".join(first.values()).split()) == sorted(n.encode() for n in BCCD_SUBSET)


def test_export_references_images(api: Api, bccd_project: tuple[int, dict[str, Any]]) -> None:
    pid, _ = bccd_project
    with zipfile.ZipFile(io.BytesIO(export(api, pid, "coco", images="reference"))) as zf:
        assert not [n for n in zf.namelist() if n.endswith(".jpg")]
        coco = json.loads(zf.read("annotations.json"))
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["images"] == {"all": len(BCCD_SUBSET)}
    url = coco["images"][0]["coco_url"]
    assert api.get(url, role="annotator").status_code == 200
    # the annotations alone label the project's images matched by file name
    other = make_project(api, task="detection", classes=("RBC", "WBC", "Platelets"))["id"]
    files = [(f"{n}.jpg", (BCCD / "JPEGImages" / f"{n}.jpg").read_bytes()) for n in BCCD_SUBSET]
    upload(api, other, files)
    report = do_import(api, other, zip_of({"annotations.json": json.dumps(coco).encode()}),
                       "coco")["report"]
    assert report["images"]["existing"] == len(BCCD_SUBSET) and report["images"]["new"] == 0
    assert report["labels"]["created"] == len(BCCD_SUBSET)
    assert labels_by_sha(api, other).keys() == labels_by_sha(api, pid).keys()


def test_mapping_filter_and_keep(api: Api) -> None:
    pid = make_project(api, task="detection", classes=("red",))["id"]
    report = do_import(api, pid, bccd_voc_zip(BCCD_SUBSET[:3]), "voc",
                       mapping=json.dumps({"RBC": "red", "WBC": None}),
                       create_classes="false")["report"]
    assert report["classes_created"] == []
    assert report["problem_counts"]["unknown_class"] >= 1  # Platelets: not in the project
    labels = labels_by_sha(api, pid)
    assert {b["label"] for lab in labels.values() for b in lab["boxes"]} == {"red"}
    # keep: labeled images are left alone, even when the import differs
    again = do_import(api, pid, bccd_voc_zip(BCCD_SUBSET[:3]), "voc",
                      mapping=json.dumps({"RBC": "red", "WBC": "red"}), existing="keep",
                      create_classes="false")["report"]
    assert again["labels"]["kept"] == 3 and again["labels"]["created"] == 0
    assert labels_by_sha(api, pid) == labels


def classification_zip() -> tuple[bytes, dict[str, list[str]]]:
    colors = {"cat": [(200, 10, 10), (190, 20, 30), (180, 40, 10)],
              "dog": [(10, 200, 10), (20, 190, 30)], "fox": [(10, 10, 200)]}
    members, expected = {}, {}
    for tag, shades in colors.items():
        for i, color in enumerate(shades):
            data = jpeg(40 + i, 30, color)
            members[f"train/{tag}/{tag}{i}.jpg"] = data
            expected[sha256_hex(data)] = [tag]
    return zip_of(members), expected


@pytest.mark.parametrize("fmt", ["coco", "yolo", "azureml", "labelstudio"])
def test_classification_round_trip(api: Api, fmt: str) -> None:
    archive, expected = classification_zip()
    pid = make_project(api, task="multiclass", classes=("cat",))["id"]
    report = do_import(api, pid, archive, "folders")["report"]
    assert report["classes_created"] == ["dog", "fox"] and report["labels"]["created"] == 6
    assert {s: lab["tags"] for s, lab in labels_by_sha(api, pid).items()} == expected
    other = make_project(api, task="multiclass", classes=())["id"]
    exported = export(api, pid, fmt, split="50,50,0")
    import_fmt = "folders" if fmt == "yolo" else fmt
    assert do_import(api, other, exported, import_fmt)["report"]["problems_total"] == 0
    assert {s: lab["tags"] for s, lab in labels_by_sha(api, other).items()} == expected


def test_csv_export(api: Api, bccd_project: tuple[int, dict[str, Any]]) -> None:
    pid, job = bccd_project
    with zipfile.ZipFile(io.BytesIO(export(api, pid, "csv", images="reference"))) as zf:
        rows = zf.read("labels.csv").decode().splitlines()
    assert rows[0].startswith("image,split,width,height,label,x,y,box_width,box_height")
    assert len(rows) - 1 == job["report"]["objects"]["imported"]


def test_problems_are_reported_per_file_and_object(api: Api) -> None:
    pid = make_project(api, task="detection", classes=("cat",))["id"]
    coco = {"categories": [{"id": 1, "name": "cat"}],
            "images": [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48},
                       {"id": 2, "file_name": "missing.jpg", "width": 64, "height": 48},
                       {"id": 3, "file_name": "broken.jpg", "width": 64, "height": 48},
                       {"id": 4, "file_name": "b.jpg", "width": 99, "height": 48}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 2, 20, 10]},
                {"id": 11, "image_id": 1, "category_id": 1, "bbox": [50, 2, 40, 10]},
                {"id": 12, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4]},
                {"id": 13, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4],
                 "iscrowd": 1},
                {"id": 14, "image_id": 1, "category_id": 1,
                 "segmentation": [[10, 10, 30, 10, 30, 30]], "bbox": [10, 10, 20, 20]},
                {"id": 15, "image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4]},
                {"id": 16, "image_id": 4, "category_id": 1, "bbox": [1, 2, 3, 4]}]}
    archive = zip_of({"coco.json": json.dumps(coco).encode(), "a.jpg": jpeg(64, 48),
                      "broken.jpg": b"\xff\xd8\xff not really", "b.jpg": jpeg(64, 48, (1, 1, 1))})
    report = do_import(api, pid, archive, "coco")["report"]
    got = {(p["file"], p.get("image"), p.get("object"), p["code"]) for p in report["problems"]}
    assert got == {
        ("coco.json", "a.jpg", 1, "outside_image"),
        ("coco.json", "a.jpg", 2, "unknown_category"),
        ("coco.json", "a.jpg", 3, "crowd_skipped"),
        ("coco.json", "missing.jpg", None, "image_missing"),
        ("broken.jpg", None, None, "corrupt_image"),
        ("coco.json", "b.jpg", None, "size_mismatch")}
    [label] = labels_by_sha(api, pid).values()
    assert [(b["label"], b.get("polygon")) for b in label["boxes"]] == [
        ("cat", None), ("cat", [[10.0, 10.0], [30.0, 10.0], [30.0, 30.0]])]


@pytest.mark.parametrize("members, code, status", [
    ({"../evil.txt": b"x"}, "archive_unsafe_path", 422),
    ({"/etc/evil.txt": b"x"}, "archive_unsafe_path", 422),
])
def test_hostile_uploads_are_refused(api: Api, members: dict[str, bytes], code: str,
                                     status: int) -> None:
    pid = make_project(api, task="detection", classes=())["id"]
    assert_error(start_import(api, pid, zip_of(members), "voc"), status, code)
    assert count(api, ImportJob, pid) == 0


def test_symlink_bomb_and_junk_uploads_are_refused(api: Api) -> None:
    from tests.test_dataset_archives import declared_size_zip, symlink_zip, tar_bytes, tar_member

    pid = make_project(api, task="detection", classes=())["id"]
    assert_error(start_import(api, pid, symlink_zip(), "voc"), 422, "archive_link")
    assert_error(start_import(api, pid, tar_bytes([tar_member("l", b"2", link="/etc")]), "voc",
                              name="x.tar.gz"), 422, "archive_link")
    assert_error(start_import(api, pid, declared_size_zip(4_000_000_000), "voc"), 413,
                 "archive_member_too_large")
    assert_error(start_import(api, pid, b"<html>no</html>", "voc"), 415, "unsupported_archive")
    assert_error(start_import(api, pid, bccd_voc_zip()[:-100], "voc"), 422, "archive_invalid")
    assert count(api, ImportJob, pid) == 0
    blobs = Path(api.settings.blob_dir) / "imports"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))


def test_import_needs_operator_and_valid_input(api: Api) -> None:
    pid = make_project(api, task="detection", classes=())["id"]
    assert_error(start_import(api, pid, bccd_voc_zip(), "voc", role="annotator"), 403,
                 "forbidden")
    assert_error(start_import(api, pid, bccd_voc_zip(), "pascal"), 422, "invalid_request")
    assert_error(start_import(api, pid, bccd_voc_zip(), "voc", mapping="[1]"), 422,
                 "invalid_mapping")
    assert_error(start_import(api, 999, bccd_voc_zip(), "voc"), 404, "not_found")
    assert_error(api.get("/api/v1/imports/12345"), 404, "not_found")
    assert_error(api.get(f"/api/v1/projects/{pid}/export", params={"format": "voc",
                                                                  "split": "1,2"}),
                 422, "invalid_split")
    cls = make_project(api, task="multiclass")["id"]
    assert_error(api.get(f"/api/v1/projects/{cls}/export", params={"format": "voc"}), 422,
                 "format_task_mismatch")
    assert_error(api.get(f"/api/v1/projects/{cls}/export",
                         params={"format": "yolo", "images": "reference"}), 422,
                 "images_required")
    # folders into a detection project is a fatal error: the job FAILED, nothing written
    r = start_import(api, pid, classification_zip()[0], "folders")
    run_imports(api)
    job = api.get(f"/api/v1/imports/{r.json()['id']}").json()
    assert (job["status"], job["error_code"]) == ("FAILED", "format_task_mismatch")
    assert count(api, Image, pid) == 0


def test_a_fatal_error_leaves_nothing_half_imported(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.datasets.importer as importer

    calls = {"n": 0}
    real = importer.record_annotation

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(importer, "record_annotation", failing)
    pid = make_project(api, task="detection", classes=())["id"]
    r = start_import(api, pid, bccd_voc_zip(), "voc")
    run_imports(api)
    job = api.get(f"/api/v1/imports/{r.json()['id']}").json()
    assert (job["status"], job["error_code"]) == ("FAILED", "internal_error")
    assert "Traceback" not in job["error"] and "nothing was written" in job["error"]
    assert calls["n"] == 4
    assert (count(api, Image, pid), count(api, Annotation, pid),
            count(api, ProjectClass, pid)) == (0, 0, 0)


def test_suggestions_export_flagged(api: Api, bccd_project: tuple[int, dict[str, Any]]) -> None:
    from service.tables import ModelVersion, Suggestion, TrainingRun

    pid, _ = bccd_project
    ctx = api.client.app.state.ctx  # type: ignore[attr-defined]
    [(name, data)] = [("BloodImage_00100.jpg",
                       (BCCD / "JPEGImages" / "BloodImage_00100.jpg").read_bytes())]
    iid = upload(api, pid, [(name, data)]).json()["images"][0]["id"]
    with ctx.sessions.begin() as session:
        run = TrainingRun(project_id=pid, status="SUCCEEDED", trigger="manual")
        session.add(run)
        session.flush()
        model = ModelVersion(project_id=pid, run_id=run.id, version=3, task="detection",
                             classes=["RBC", "WBC", "Platelets"], backbone="b", kind="k",
                             device="cpu", pipeline_key="k", pipeline_sha256="s",
                             thresholds=[], metrics={}, train_image_ids=[], promoted=True)
        session.add(model)
        session.flush()
        session.add(Suggestion(id="s" * 32, project_id=pid, image_id=iid, model_id=model.id,
                               payload={"model_version": 3, "tags": [], "boxes": [
                                   {"label": "RBC", "confidence": 0.9, "x": 10, "y": 20,
                                    "width": 30, "height": 40},
                                   {"label": "WBC", "confidence": 0.3, "x": 100, "y": 200,
                                    "width": 50, "height": 60, "below_threshold": True}]}))
    manual = export(api, pid, "labelstudio", images="reference")
    with zipfile.ZipFile(io.BytesIO(manual)) as zf:
        assert len(json.loads(zf.read("tasks.json"))) == len(BCCD_SUBSET)
    mixed = export(api, pid, "labelstudio", labels="with_suggestions", min_confidence=0.2,
                   images="reference")
    with zipfile.ZipFile(io.BytesIO(mixed)) as zf:
        tasks = {t["id"]: t for t in json.loads(zf.read("tasks.json"))}
        assert zf.read("predicted.txt").decode().split() == [tasks[iid]["data"]["image"]]
    assert len(tasks) == len(BCCD_SUBSET) + 1
    [prediction] = tasks[iid]["predictions"]
    assert tasks[iid]["annotations"] == [] and prediction["model_version"] == "3"
    assert [r["score"] for r in prediction["result"]] == [0.9, 0.3]
    assert math.isclose(prediction["score"], 0.6)
    strict = export(api, pid, "coco", labels="with_suggestions", images="reference")
    with zipfile.ZipFile(io.BytesIO(strict)) as zf:  # default: the model's own thresholds
        coco = json.loads(zf.read("annotations.json"))
    scored = [a for a in coco["annotations"] if a["image_id"] == iid]
    assert [(a["score"], a["bbox"]) for a in scored] == [(0.9, [10, 20, 30, 40])]
    assert [i["prelabel_source"] for i in coco["images"] if i["id"] == iid] == ["suggestion"]


def test_export_names_are_unique_and_safe(api: Api) -> None:
    pid = make_project(api, task="detection", classes=("a",))["id"]
    files = [("x.jpg", jpeg(color=(1, 1, 1))), ("x.jpg", jpeg(color=(2, 2, 2))),
             ("X.png", jpeg(color=(3, 3, 3))), ("../a b.jpg", jpeg(color=(4, 4, 4))),
             ("solo.jpeg", jpeg(color=(5, 5, 5)))]
    ids = [i["id"] for i in upload(api, pid, files).json()["images"]]
    for iid in ids:
        api.post(f"/api/v1/images/{iid}/annotations", json={"boxes": []})
    with zipfile.ZipFile(io.BytesIO(export(api, pid, "voc"))) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("JPEGImages/"))
        xmls = [n for n in zf.namelist() if n.startswith("Annotations/")]
    assert names == sorted(["JPEGImages/" + n for n in (
        f"x~{ids[0]}.jpg", f"x~{ids[1]}.jpg", "X.png.jpg", "a_b.jpg", "solo.jpeg")])
    assert len(set(xmls)) == len(xmls) == 5


def test_archives_have_their_own_body_limit(tmp_path: Path, cache_dir: Path,
                                            sqlite_url: str) -> None:
    from tests.conftest import make_api, settings_values

    archive = bccd_voc_zip()
    values = settings_values(tmp_path, sqlite_url, cache_dir, max_upload_bytes=len(archive) // 2,
                             max_import_bytes=len(archive) + 10_000)
    gen = make_api(values)
    api = next(gen)
    try:
        pid = make_project(api, task="detection", classes=())["id"]
        assert start_import(api, pid, archive, "voc").status_code == 202  # over the upload limit
        r = api.post(f"/api/v1/projects/{pid}/images",
                     files=[("files", ("a.jpg", archive, "image/jpeg"))])
        assert_error(r, 413, "payload_too_large")
        assert_error(start_import(api, pid, archive + b"\0" * 20_000, "voc"), 413,
                     "payload_too_large")
    finally:
        gen.close()
