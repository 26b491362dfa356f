"""API behaviour without a worker: projects, auth, uploads, labels, errors (SQLite + PostgreSQL)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from tests.conftest import Api
from tests.images import card_crops, exif_rotated_jpeg, jpeg


def make_project(api: Api, task: str = "multiclass", classes: tuple[str, ...] = ("a", "b")
                 ) -> dict[str, Any]:
    r = api.post("/api/v1/projects", json={"name": "p", "task": task, "classes": list(classes)})
    assert r.status_code == 201, r.text
    return r.json()


def upload(api: Api, pid: int, files: list[tuple[str, bytes]], role: str = "annotator") -> Any:
    return api.post(f"/api/v1/projects/{pid}/images", role=role,
                    files=[("files", (n, d, "application/octet-stream")) for n, d in files])


def assert_error(r: Any, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert "Traceback" not in r.text


def test_health_and_docs(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}
    assert api.client.get("/docs").status_code == 200
    assert "/api/v1/images/{iid}/suggestions" in api.client.get("/openapi.json").json()["paths"]


def test_project_crud_and_classes(api: Api) -> None:
    p = make_project(api, classes=("cat", "dog"))
    assert p["classes"] == ["cat", "dog"] and p["promoted_model"] is None
    r = api.post(f"/api/v1/projects/{p['id']}/classes", json={"name": "bird"})
    assert r.status_code == 201
    assert_error(api.post(f"/api/v1/projects/{p['id']}/classes", json={"name": "bird"}), 409,
                 "class_exists")
    assert api.get(f"/api/v1/projects/{p['id']}").json()["classes"] == ["cat", "dog", "bird"]
    assert [x["id"] for x in api.get("/api/v1/projects", role="annotator").json()] == [p["id"]]


@pytest.mark.parametrize("body, code", [
    ({"name": "x", "task": "segmentation", "classes": []}, "invalid_request"),
    ({"name": "", "task": "multiclass", "classes": []}, "invalid_request"),
    ({"name": "x", "task": "multiclass", "classes": ["a", "a"]}, "invalid_request"),
    ({"name": "x", "task": "multiclass", "classes": ["a"], "extra": 1}, "invalid_request"),
])
def test_project_validation(api: Api, body: dict[str, Any], code: str) -> None:
    assert_error(api.post("/api/v1/projects", json=body), 422, code)


def test_auth_roles(api: Api) -> None:
    assert_error(api.client.get("/api/v1/projects"), 401, "unauthorized")
    assert_error(api.client.get("/api/v1/projects", headers={"Authorization": "Bearer nope"}),
                 401, "unauthorized")
    assert_error(api.post("/api/v1/projects", role="operator",
                          json={"name": "x", "task": "multiclass", "classes": ["a", "b"]}),
                 403, "forbidden")
    p = make_project(api)
    assert_error(api.post(f"/api/v1/projects/{p['id']}/training-runs", role="annotator"), 403,
                 "forbidden")
    r = api.post("/api/v1/keys", json={"name": "k", "role": "annotator"})
    assert r.status_code == 201 and r.json()["key"].startswith("pl_")
    assert_error(api.post("/api/v1/keys", role="operator", json={"name": "k", "role": "admin"}),
                 403, "forbidden")
    made = r.json()
    h = {"Authorization": f"Bearer {made['key']}"}
    assert api.client.get("/api/v1/projects", headers=h).status_code == 200
    assert api.client.delete(f"/api/v1/keys/{made['id']}", headers=api.h()).status_code == 204
    assert_error(api.client.get("/api/v1/projects", headers=h), 401, "unauthorized")


def test_cross_project_access_is_404(api: Api) -> None:
    a, b = make_project(api), make_project(api)
    img_b = upload(api, b["id"], [("b.jpg", jpeg())]).json()["images"][0]["id"]
    scoped = api.post("/api/v1/keys", json={"name": "only a", "role": "operator",
                                            "project_id": a["id"]}).json()["key"]
    h = {"Authorization": f"Bearer {scoped}"}
    c = api.client
    assert_error(c.get(f"/api/v1/projects/{b['id']}", headers=h), 404, "not_found")
    assert_error(c.get(f"/api/v1/images/{img_b}", headers=h), 404, "not_found")
    assert_error(c.get(f"/api/v1/images/{img_b}/file", headers=h), 404, "not_found")
    assert_error(c.get(f"/api/v1/images/{img_b}/suggestions", headers=h), 404, "not_found")
    assert_error(c.post(f"/api/v1/images/{img_b}/annotations", headers=h, json={"tags": ["a"]}),
                 404, "not_found")
    assert_error(c.post(f"/api/v1/projects/{b['id']}/training-runs", headers=h), 404,
                 "not_found")
    assert [p["id"] for p in c.get("/api/v1/projects", headers=h).json()] == [a["id"]]
    # an image id from another project inside a batch request
    assert_error(api.post(f"/api/v1/projects/{a['id']}/suggestions",
                          json={"image_ids": [img_b]}), 409, "no_model")


def test_upload_dedup_listing_and_file(api: Api) -> None:
    p = make_project(api)
    crops = card_crops("train", per_class=1)[:3]
    r = upload(api, p["id"], [(s.name, s.data) for s in crops] + [(crops[0].name, crops[0].data)])
    assert r.status_code == 201, r.text
    images = r.json()["images"]
    assert [i["duplicate"] for i in images] == [False, False, False, True]
    assert images[3]["id"] == images[0]["id"]
    with Image.open(io.BytesIO(crops[0].data)) as im:
        assert (images[0]["width"], images[0]["height"]) == im.size
    page = api.get(f"/api/v1/projects/{p['id']}/images", params={"limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = api.get(f"/api/v1/projects/{p['id']}/images",
                   params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    assert_error(api.get(f"/api/v1/projects/{p['id']}/images", params={"cursor": "zz"}), 422,
                 "invalid_cursor")
    f = api.get(f"/api/v1/images/{images[1]['id']}/file", role="annotator")
    assert f.status_code == 200 and f.content == crops[1].data
    assert f.headers["content-type"] == "image/jpeg"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_sizes(api: Api, orientation: int) -> None:
    p = make_project(api)
    img = upload(api, p["id"], [("r.jpg", exif_rotated_jpeg(orientation))]).json()["images"][0]
    expected = (40, 80) if orientation >= 5 else (80, 40)
    assert (img["width"], img["height"]) == expected


def _truncated() -> bytes:
    data = card_crops("train", per_class=1)[0].data
    return data[: len(data) // 2]


BAD_FILES = [
    ("empty.png", b"", 422, "empty_file"),
    ("page.png", b"<!doctype html><html><body>hi</body></html>", 415, "unsupported_media_type"),
    ("x.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415,
     "unsupported_media_type"),
    ("random.jpg", bytes(range(256)) * 8, 415, "unsupported_media_type"),
    ("cut.jpg", None, 422, "corrupt_image"),
]


@pytest.mark.parametrize("name, data, status, code", BAD_FILES)
def test_bad_uploads_reported_per_file(api: Api, name: str, data: bytes | None, status: int,
                                       code: str) -> None:
    p = make_project(api)
    r = upload(api, p["id"], [(name, data if data is not None else _truncated()),
                              ("ok.jpg", jpeg())])
    assert r.status_code == 201, r.text
    body = r.json()
    assert [e["code"] for e in body["errors"]] == [code]
    assert body["errors"][0]["filename"] == name
    assert len(body["images"]) == 1  # the good file is kept
    listed = api.get(f"/api/v1/projects/{p['id']}/images").json()["items"]
    assert [i["filename"] for i in listed] == ["ok.jpg"]
    # the same file on ad-hoc predict is an HTTP error (once a model exists); before: no_model
    assert_error(api.post(f"/api/v1/projects/{p['id']}/predict",
                          files={"file": (name, data or b"", "image/png")}), 409, "no_model")


def test_decompression_bomb(api: Api) -> None:
    p = make_project(api)
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG", optimize=True)
    body = upload(api, p["id"], [("bomb.png", buf.getvalue())]).json()
    assert [e["code"] for e in body["errors"]] == ["image_too_large"]
    assert body["images"] == []


def test_body_limit_413(tmp_path: Any, sqlite_url: str, cache_dir: Any) -> None:
    from tests.conftest import make_api, settings_values

    gen = make_api(settings_values(tmp_path, sqlite_url, cache_dir, max_upload_bytes=50_000))
    api = next(gen)
    p = make_project(api)
    big = jpeg(1200, 1200) + b"\0" * 60_000
    assert_error(upload(api, p["id"], [("big.jpg", big)]), 413, "payload_too_large")

    def chunks() -> Any:  # chunked transfer encoding: no Content-Length header
        for _ in range(20):
            yield b"x" * 10_000

    r = api.client.post(f"/api/v1/projects/{p['id']}/images", content=chunks(),
                        headers={**api.h(), "Content-Type": "multipart/form-data; boundary=zz"})
    assert_error(r, 413, "payload_too_large")
    assert api.get(f"/api/v1/projects/{p['id']}/images").json()["items"] == []
    gen.close()


def test_annotation_validation_and_history(api: Api) -> None:
    p = make_project(api, classes=("a", "b"))
    iid = upload(api, p["id"], [("x.jpg", jpeg())]).json()["images"][0]["id"]
    url = f"/api/v1/images/{iid}/annotations"
    assert_error(api.post(url, json={"tags": ["zebra"]}), 422, "unknown_class")
    assert_error(api.post(url, json={"tags": ["a", "b"]}), 422, "one_tag_required")
    assert_error(api.post(url, json={"tags": []}), 422, "one_tag_required")
    assert_error(api.post(url, json={}), 422, "tags_required")
    assert_error(api.post(url, json={"boxes": [{"label": "a", "x": 1, "y": 1, "width": 2,
                                                "height": 2}]}), 422, "boxes_not_supported")
    assert_error(api.post(url, json={"tags": ["a"], "source": "suggestion_accepted"}), 422,
                 "suggestion_required")
    assert_error(api.post(url, json={"tags": ["a"], "source": "suggestion_accepted",
                                     "suggestion_id": "deadbeef"}), 422, "invalid_suggestion")
    assert_error(api.post(url, json={"tags": ["a"], "source": "guess"}), 422, "invalid_request")
    assert api.post(url, role="annotator", json={"tags": ["a"]}).status_code == 201
    assert api.post(url, role="annotator", json={"tags": ["b"]}).status_code == 201
    hist = api.get(url).json()
    assert hist["latest"]["tags"] == ["b"]
    assert [h["tags"] for h in hist["history"]] == [["b"], ["a"]]
    assert [h["is_current"] for h in hist["history"]] == [True, False]
    listed = api.get(f"/api/v1/projects/{p['id']}/images", params={"status": "labeled"}).json()
    assert [i["id"] for i in listed["items"]] == [iid]
    stats = api.get(f"/api/v1/projects/{p['id']}/stats").json()
    assert stats["labeled"] == 1 and stats["annotations_by_source"] == {"manual": 2}
    assert {c["name"]: c["labeled_images"] for c in stats["classes"]} == {"a": 0, "b": 1}


def test_multilabel_allows_empty_and_many_tags(api: Api) -> None:
    p = make_project(api, task="multilabel", classes=("a", "b", "c"))
    iid = upload(api, p["id"], [("x.jpg", jpeg())]).json()["images"][0]["id"]
    url = f"/api/v1/images/{iid}/annotations"
    assert api.post(url, json={"tags": []}).status_code == 201
    assert api.post(url, json={"tags": ["a", "c"]}).status_code == 201
    assert_error(api.post(url, json={"tags": ["a", "a"]}), 422, "duplicate_tag")


def test_no_model_yet(api: Api) -> None:
    p = make_project(api)
    iid = upload(api, p["id"], [("x.jpg", jpeg())]).json()["images"][0]["id"]
    assert_error(api.get(f"/api/v1/images/{iid}/suggestions", role="annotator"), 409, "no_model")
    assert_error(api.post(f"/api/v1/projects/{p['id']}/suggestions",
                          json={"image_ids": [iid]}), 409, "no_model")
    assert api.get(f"/api/v1/projects/{p['id']}/models").json() == []


def test_training_runs_queue_and_cancel(api: Api) -> None:
    p = make_project(api)
    r = api.post(f"/api/v1/projects/{p['id']}/training-runs", role="operator")
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] == "QUEUED" and run["trigger"] == "manual"
    again = api.post(f"/api/v1/projects/{p['id']}/training-runs", role="operator")
    assert_error(again, 409, "run_already_queued")
    assert again.json()["error"]["details"]["run_id"] == run["id"]
    c = api.post(f"/api/v1/training-runs/{run['id']}/cancel", role="operator")
    assert c.json()["status"] == "CANCELLED"
    assert_error(api.post(f"/api/v1/training-runs/{run['id']}/cancel", role="operator"), 409,
                 "run_finished")
    assert_error(api.get("/api/v1/training-runs/999999"), 404, "not_found")
    assert_error(api.post("/api/v1/models/999999/promote"), 404, "not_found")


def test_policy_queues_once_every_class_has_minimum(api: Api) -> None:
    p = make_project(api, classes=("a", "b"))
    ids = [i["id"] for i in upload(api, p["id"], [(f"{n}.jpg", jpeg(color=(n * 20, 9, 9)))
                                                 for n in range(11)]).json()["images"]]
    for n, iid in enumerate(ids[:10]):
        api.post(f"/api/v1/images/{iid}/annotations", json={"tags": ["a" if n < 5 else "b"]})
        runs = api.get(f"/api/v1/projects/{p['id']}/training-runs").json()
        assert len(runs) == (1 if n == 9 else 0), (n, runs)
    assert runs[0]["status"] == "QUEUED" and runs[0]["trigger"] == "auto"
    api.post(f"/api/v1/images/{ids[10]}/annotations", json={"tags": ["a"]})
    assert len(api.get(f"/api/v1/projects/{p['id']}/training-runs").json()) == 1


def test_unknown_route_and_method(api: Api) -> None:
    assert_error(api.get("/api/v1/nothing"), 404, "not_found")
    assert_error(api.client.delete("/healthz"), 405, "method_not_allowed")


def test_enqueue_only_after_commit(api: Api) -> None:
    """Rejected requests send nothing; a label below the threshold sends one views job (the
    worker embeds the head's training views ahead of the run); the label that queues a run sends
    exactly one message."""
    queue = api.settings.broker_dir / "queue"

    def messages() -> int:
        return len(list(queue.glob("*"))) if queue.exists() else 0

    p = make_project(api, classes=("a", "b"))
    ids = [i["id"] for i in upload(api, p["id"], [(f"{n}.jpg", jpeg(color=(n * 20, 9, 9)))
                                                 for n in range(10)]).json()["images"]]
    sent = messages()
    assert sent == 1  # one embedding job for the ten new images
    for n, iid in enumerate(ids[:9]):
        api.post(f"/api/v1/images/{iid}/annotations", json={"tags": ["a" if n < 5 else "b"]})
    assert_error(api.post(f"/api/v1/images/{ids[9]}/annotations", json={"tags": ["zebra"]}),
                 422, "unknown_class")
    assert messages() == sent + 9  # one views job per label, nothing for the error
    api.post(f"/api/v1/images/{ids[9]}/annotations", json={"tags": ["b"]})
    assert messages() == sent + 10
    upload(api, p["id"], [("dup.jpg", jpeg(color=(0, 9, 9)))])  # a duplicate: nothing to embed
    assert messages() == sent + 10
