"""Reading a dataset folder in one of the import formats into :class:`SourceItem` objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.datasets.azureml import read_azureml
from service.datasets.coco import read_coco
from service.datasets.files import FileIndex
from service.datasets.folders import read_folders
from service.datasets.items import ImportFailed, SourceItem
from service.datasets.labelstudio import read_labelstudio
from service.datasets.voc import read_voc
from service.datasets.yolo import read_yolo

_NAMES = {"coco": "COCO JSON", "voc": "Pascal VOC XML", "azureml": "Azure ML JSONL",
          "labelstudio": "Label Studio JSON", "yolo": "YOLO", "folders": "image"}


def read_dataset(fmt: str, index: FileIndex, task: str, annotation_file: Path | None = None
                 ) -> tuple[list[SourceItem], list[dict[str, Any]]]:
    """Every item of the dataset and the problems found in files as a whole.

    For a whole folder, images that no annotation names come last, without a label; with
    ``annotation_file`` only that file is read. Raises ImportFailed when nothing fits ``fmt``.
    """
    notes: list[dict[str, Any]] = []
    files = [annotation_file] if annotation_file is not None else None
    if fmt == "folders" or (fmt == "yolo" and task != "detection"):
        if task == "detection":
            raise ImportFailed("format_task_mismatch", "folder-per-class data has no boxes; "
                               "import it into a multiclass or multilabel project")
        items = list(read_folders(index))
    elif fmt == "yolo":
        items = list(read_yolo(index))
    elif fmt == "voc":
        items = list(read_voc(index, files))
    elif fmt == "coco":
        items = list(read_coco(index, files, notes))
    elif fmt == "azureml":
        items = list(read_azureml(index, files, notes))
    elif fmt == "labelstudio":
        items = list(read_labelstudio(index, files, notes))
    else:
        raise ImportFailed("unsupported_format", f"unknown import format {fmt!r}")
    if not items and fmt not in ("folders", "yolo"):
        detail = f": {notes[0]['message']}" if notes else ""
        raise ImportFailed("no_annotations",
                           f"no {_NAMES[fmt]} annotation files found in the dataset{detail}")
    if annotation_file is None:  # a whole dataset: its other images come without a label
        items += [SourceItem(file=index.rel(p), image_ref=index.rel(p), image_path=p)
                  for p in index.unused_images()]
    if not items:
        raise ImportFailed("nothing_to_import", "the dataset holds no images and no labels")
    return items, notes
