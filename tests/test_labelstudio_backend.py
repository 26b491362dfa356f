"""The Label Studio ML backend routes against a real image host (HTTP), on SQLite and
PostgreSQL. The real Label Studio server drives them in tests/test_labelstudio_server.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.labelstudio.label_config import UnsupportedConfig, parse_label_config
from service.labelstudio.results import label_from_result, ls_prediction
from tests.conftest import Api, make_api, settings_values
from tests.images import exif_rotated_jpeg
from tests.labelstudio_host import TOKEN, ImageHost, image_host
from tests.test_api import assert_error

CHOICES = ('<View><Image name="image" value="$image"/><Choices name="tags" toName="image">'
           '<Choice value="cards"/><Choice value="blood"/></Choices></View>')
BOXES = ('<View><Image name="img" value="$photo"/><Text name="t" value="$caption"/>'
         '<RectangleLabels name="label" toName="img"><Label value="RBC"/><Label value="WBC"/>'
         '<Label value="Platelets"/></RectangleLabels>'
         '<TextArea name="note" toName="img"/></View>')
LS = "/labelstudio"
BCCD_0 = "bccd/JPEGImages/BloodImage_00000.jpg"  # 640x480
BCCD_1 = "bccd/JPEGImages/BloodImage_00001.jpg"


@pytest.fixture
def host() -> Iterator[ImageHost]:
    with image_host() as served:
        yield served


@pytest.fixture
def ls_api(tmp_path: Path, db_url: str, cache_dir: Path, host: ImageHost) -> Iterator[Api]:
    """The app with Label Studio at the image host, a second name for it allowed."""
    yield from make_api(settings_values(
        tmp_path, db_url, cache_dir, labelstudio_url=host.url, labelstudio_api_key=TOKEN,
        labelstudio_allowed_hosts=f"localhost:{host.port}"))


@pytest.mark.parametrize(("xml", "expect"), [
    (CHOICES, ("multiclass", "tags", "image", "choices", "image", ("cards", "blood"))),
    (CHOICES.replace('toName="image"', 'toName="image" choice="multiple"'),
     ("multilabel", "tags", "image", "choices", "image", ("cards", "blood"))),
    (BOXES, ("detection", "label", "img", "rectanglelabels", "photo",
             ("RBC", "WBC", "Platelets"))),
])
def test_supported_label_configs(xml: str, expect: tuple[Any, ...]) -> None:
    m = parse_label_config(xml)
    assert (m.task, m.from_name, m.to_name, m.type, m.data_key, m.labels) == expect


@pytest.mark.parametrize(("xml", "code", "says"), [
    ("", "invalid_label_config", "empty"),
    ("<View><Image name='i' value='$i'/>", "invalid_label_config", "not valid XML"),
    ('<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="a"/>'
     '<Choice value="b"/></Choices></View>', "unsupported_label_config", "no <Image>"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/>'
     '<Choice value="b"/></Choices><RectangleLabels name="r" toName="i"><Label value="a"/>'
     '</RectangleLabels></View>', "unsupported_label_config", "one control"),
    ('<View><Image name="i" value="$i"/><PolygonLabels name="p" toName="i">'
     '<Label value="a"/></PolygonLabels></View>', "unsupported_label_config", "RectangleLabels"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="a"/>'
     '</Choices></View>', "unsupported_label_config", "two choices"),
    ('<View><Image name="i" value="http://x/y.jpg"/><Choices name="c" toName="i">'
     '<Choice value="a"/><Choice value="b"/></Choices></View>', "unsupported_label_config",
     "task field"),
    ('<!DOCTYPE v [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><View>&b;</View>',
     "invalid_label_config", "not valid XML"),  # entities are never expanded
])
def test_unsupported_label_configs(xml: str, code: str, says: str) -> None:
    with pytest.raises(UnsupportedConfig) as info:
        parse_label_config(xml)
    assert info.value.code == code and says in info.value.message


def test_result_adapters_speak_percent() -> None:
    boxes = parse_label_config(BOXES)
    payload = {"width": 640, "height": 480, "tags": [], "boxes": [
        {"label": "WBC", "confidence": 0.91, "x": 64.0, "y": 48.0, "width": 320.0,
         "height": 240.0, "below_threshold": False},
        {"label": "RBC", "confidence": 0.2, "x": 0.0, "y": 0.0, "width": 10.0, "height": 10.0,
         "below_threshold": True},
        {"label": "RBC", "confidence": 0.55, "x": 600.0, "y": 400.0, "width": 40.0,
         "height": 80.0, "below_threshold": False}]}
    out = ls_prediction(payload, boxes, "v3")
    assert out["model_version"] == "v3" and out["score"] == 0.55  # the least sure item
    assert [i["value"]["rectanglelabels"] for i in out["result"]] == [["WBC"], ["RBC"]]
    first = out["result"][0]
    assert first["value"] == {"x": 10.0, "y": 10.0, "width": 50.0, "height": 50.0,
                              "rotation": 0, "rectanglelabels": ["WBC"]}
    assert (first["from_name"], first["to_name"], first["type"]) == ("label", "img",
                                                                     "rectanglelabels")
    assert (first["original_width"], first["original_height"], first["score"]) == (640, 480, 0.91)
    # and back: percent of the displayed image -> pixels
    tags, pixels = label_from_result(out["result"] + [{"from_name": "note", "value": {}}], boxes,
                                     640, 480)
    assert tags is None and pixels is not None
    assert pixels[0] == {"label": "WBC", "x": 64.0, "y": 48.0, "width": 320.0, "height": 240.0}
    assert pixels[1]["x"] == pytest.approx(600.0, abs=0.01)
    assert pixels[1]["height"] == pytest.approx(80.0, abs=0.01)  # percent kept to 4 decimals

    choices = parse_label_config(CHOICES)
    out = ls_prediction({"tags": [{"label": "blood", "confidence": 0.87}]}, choices, "v1")
    assert out == {"result": [{"from_name": "tags", "to_name": "image", "type": "choices",
                               "score": 0.87, "value": {"choices": ["blood"]}}],
                   "score": 0.87, "model_version": "v1"}
    assert ls_prediction({"tags": []}, choices, "v1")["result"] == []


def setup(api: Api, xml: str, project: str = "7.1764300000") -> Any:
    return api.client.post(f"{LS}/setup", json={
        "project": project, "schema": xml, "hostname": "http://ignored.example",
        "access_token": "not-used", "extra_params": {}})


def test_setup_links_a_project_from_the_config(ls_api: Api) -> None:
    r = ls_api.client.get(f"{LS}/health")
    assert r.status_code == 200 and r.json() == {"status": "UP", "model_class": "prelabel"}
    r = setup(ls_api, CHOICES)
    assert r.status_code == 200 and r.json() == {"model_version": "untrained"}
    [project] = ls_api.get("/api/v1/projects").json()
    assert (project["task"], project["classes"]) == ("multiclass", ["cards", "blood"])
    # a label added in Label Studio becomes a class; the same project stays linked
    more = CHOICES.replace('<Choice value="blood"/>', '<Choice value="blood"/><Choice value="x"/>')
    assert setup(ls_api, more).status_code == 200
    [project] = ls_api.get("/api/v1/projects").json()
    assert project["classes"] == ["cards", "blood", "x"]
    assert_error(setup(ls_api, BOXES), 409, "label_config_changed")
    assert_error(setup(ls_api, "<View/>", project="8.1764300000"), 422,
                 "unsupported_label_config")
    assert_error(setup(ls_api, CHOICES, project="../1"), 422, "invalid_project")
    assert len(ls_api.get("/api/v1/projects").json()) == 1  # nothing half-created


def predict(api: Api, tasks: list[Any], xml: str = CHOICES,
            project: str = "7.1764300000") -> Any:
    return api.client.post(f"{LS}/predict", json={
        "tasks": tasks, "project": project, "label_config": xml,
        "params": {"login": None, "password": None, "context": None}})


def test_predict_before_a_model_fetches_only_from_allowed_hosts(ls_api: Api,
                                                                host: ImageHost) -> None:
    tasks = [
        {"id": 1, "data": {"image": f"/data/upload/{BCCD_0}"}},
        {"id": 2, "data": {"image": f"http://169.254.169.254/latest/meta-data?{BCCD_1}"}},
        {"id": 3, "data": {"image": f"{host.url}/redirect?to=http://10.0.0.1/x.jpg"}},
        {"id": 4, "data": {"text": "no image"}},
        {"id": 5, "data": {"image": f"http://localhost:{host.port}/public/{BCCD_1}"}},
        {"id": 6, "data": {"image": "s3://bucket/key.jpg"}},
        {"id": 7, "data": {"image": "/data/upload/no/such.jpg"}},
        {"id": 8, "data": {"image": "/data/upload/cards/LICENSE"}},
    ]
    r = predict(ls_api, tasks)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(tasks)
    assert all(x["result"] == [] and x["model_version"] == "untrained" for x in results)
    codes = [x.get("error", {}).get("code") for x in results]
    assert codes == [None, "image_host_not_allowed", "image_host_not_allowed", "image_missing",
                     None, "unsupported_image_url", "image_fetch_failed", "unsupported_media_type"]
    assert "169.254.169.254" in results[1]["error"]["message"]
    # nothing was requested from the refused hosts; the key went to Label Studio only
    assert sorted(p for p, _ in host.seen) == sorted([  # fetched concurrently: any order
        f"/data/upload/{BCCD_0}", "/redirect?to=http://10.0.0.1/x.jpg", f"/public/{BCCD_1}",
        "/data/upload/no/such.jpg", "/data/upload/cards/LICENSE"])
    assert dict(host.seen)[f"/public/{BCCD_1}"] is None
    assert dict(host.seen)[f"/data/upload/{BCCD_0}"] == f"Token {TOKEN}"
    [project] = ls_api.get("/api/v1/projects").json()
    images = ls_api.get(f"/api/v1/projects/{project['id']}/images").json()["items"]
    assert sorted((i["width"], i["height"]) for i in images) == [(640, 480), (640, 480)]
    # asked again: the same tasks are answered from the stored images, nothing is re-fetched
    seen = len(host.seen)
    again = predict(ls_api, [tasks[4], tasks[0]]).json()["results"]
    assert len(again) == 2 and "error" not in again[0] and len(host.seen) == seen


def webhook(api: Api, action: str, **body: Any) -> Any:
    project = {"id": 9, "created_at": "2025-11-28T03:06:40.000000Z", "label_config": BOXES}
    return api.client.post(f"{LS}/webhook", json={"action": action, "project": project, **body})


def test_webhooks_record_update_and_delete_labels(ls_api: Api, host: ImageHost) -> None:
    host.files["rotated.jpg"] = exif_rotated_jpeg(6)  # 80x40 stored, displayed 40x80
    task = {"id": 31, "data": {"photo": "/data/upload/rotated.jpg", "caption": "x"}}
    box = {"id": "a", "from_name": "label", "to_name": "img", "type": "rectanglelabels",
           "original_width": 40, "original_height": 80, "image_rotation": 0,
           "value": {"x": 25.0, "y": 50.0, "width": 50.0, "height": 25.0, "rotation": 0,
                     "rectanglelabels": ["WBC"]}}
    r = webhook(ls_api, "ANNOTATION_CREATED", task=task,
                annotation={"id": 501, "task": 31, "result": [box], "was_cancelled": False})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "ok" and r.json()["recorded"] is True
    iid = r.json()["image_id"]
    history = ls_api.get(f"/api/v1/images/{iid}/annotations").json()
    assert history["latest"]["boxes"] == [{"label": "WBC", "x": 10.0, "y": 40.0, "width": 20.0,
                                           "height": 20.0}]  # in the displayed 40x80 frame
    updated = {**box, "value": {**box["value"], "rectanglelabels": ["RBC"]}}
    r = webhook(ls_api, "ANNOTATION_UPDATED", task=task,
                annotation={"id": 501, "task": 31, "result": [updated]})
    assert r.status_code == 201 and r.json()["image_id"] == iid
    assert ls_api.get(f"/api/v1/images/{iid}/annotations").json()["latest"]["boxes"][0][
        "label"] == "RBC"
    rotated = {**box, "value": {**box["value"], "rotation": 30}}
    assert_error(webhook(ls_api, "ANNOTATION_UPDATED", task=task,
                         annotation={"id": 501, "result": [rotated]}),
                 422, "rotated_box_unsupported")
    assert_error(webhook(ls_api, "ANNOTATION_UPDATED", task=task,
                         annotation={"id": 501, "result": [
                             {**box, "value": {**box["value"], "rectanglelabels": ["Cat"]}}]}),
                 422, "invalid_box")
    # deleting another annotation of the task changes nothing; deleting this one unlabels
    assert webhook(ls_api, "ANNOTATIONS_DELETED", annotations=[{"id": 999}]).json()[
        "unlabeled_images"] == []
    r = webhook(ls_api, "ANNOTATION_DELETED", annotation={"id": 501}, task=task)
    assert r.status_code == 201 and r.json()["unlabeled_images"] == [iid]
    history = ls_api.get(f"/api/v1/images/{iid}/annotations").json()
    assert history["latest"] is None and len(history["history"]) == 2  # history kept
    assert ls_api.get(f"/api/v1/images/{iid}").json()["labeled"] is False
    # training: queued only, once; actions that are not ours are acknowledged and ignored
    assert webhook(ls_api, "START_TRAINING").json()["training_run_id"] is None  # no labels
    webhook(ls_api, "ANNOTATION_CREATED", task=task, annotation={"id": 502, "result": [box]})
    first = webhook(ls_api, "START_TRAINING")
    assert first.status_code == 201 and first.json()["training_run_id"] is not None
    again = ls_api.client.post(f"{LS}/train", json={"project": {"id": 9}})
    assert again.status_code == 201 and again.json() == {
        "status": "ok", "training_run_id": None, "reason": "a run is already queued"}
    [project] = ls_api.get("/api/v1/projects").json()
    runs = ls_api.get(f"/api/v1/projects/{project['id']}/training-runs").json()
    assert [(x["status"], x["trigger"]) for x in runs] == [("QUEUED", "manual")]
    r = webhook(ls_api, "TASKS_CREATED")
    assert r.status_code == 200 and r.json()["status"] == "ignored"


def test_choices_webhook_skips_cancelled_and_empty(ls_api: Api) -> None:
    task = {"id": 1, "data": {"image": f"/data/upload/{BCCD_0}"}}
    project = {"id": 3, "label_config": CHOICES}
    post = lambda annotation: ls_api.client.post(  # noqa: E731
        f"{LS}/webhook", json={"action": "ANNOTATION_CREATED", "project": project,
                               "task": task, "annotation": annotation})
    assert post({"id": 1, "result": [], "was_cancelled": True}).json()["recorded"] is False
    assert post({"id": 2, "result": []}).json()["recorded"] is False
    choice = {"from_name": "tags", "to_name": "image", "type": "choices",
              "value": {"choices": ["blood"]}}
    r = post({"id": 3, "result": [choice]})
    assert r.status_code == 201 and r.json()["recorded"] is True
    latest = ls_api.get(f"/api/v1/images/{r.json()['image_id']}/annotations").json()["latest"]
    assert latest["tags"] == ["blood"] and latest["source"] == "manual"
    two = {**choice, "value": {"choices": ["blood", "cards"]}}
    assert_error(post({"id": 4, "result": [two]}), 422, "one_tag_required")


def test_basic_auth_when_configured(tmp_path: Path, sqlite_url: str, cache_dir: Path) -> None:
    gen = make_api(settings_values(tmp_path, sqlite_url, cache_dir,
                                   labelstudio_username="ls", labelstudio_password="s3cret-pass"))
    api = next(gen)
    try:
        assert_error(api.client.get(f"{LS}/health"), 401, "unauthorized")
        wrong = base64.b64encode(b"ls:nope").decode()
        assert_error(api.client.get(f"{LS}/health", headers={"Authorization": f"Basic {wrong}"}),
                     401, "unauthorized")
        good = base64.b64encode(b"ls:s3cret-pass").decode()
        r = api.client.get(f"{LS}/health", headers={"Authorization": f"Basic {good}"})
        assert r.status_code == 200 and r.json()["status"] == "UP"
    finally:
        gen.close()
