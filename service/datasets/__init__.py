"""Dataset import and export: COCO, Pascal VOC, YOLO, Azure ML JSONL, Label Studio, folders, CSV.

Readers turn a folder into :class:`~service.datasets.items.SourceItem` objects (one per image,
coordinates as the format states them); :mod:`.importer` validates them against the project and
writes them in one transaction. Writers receive :class:`~service.datasets.items.ExportItem`
objects and write archive members; :mod:`.exporter` streams the archive.
"""
