"""Reading a Label Studio label config: which control we pre-label, for which image, with
which labels, as which prelabel task."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any
from xml.etree.ElementTree import Element

from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

# control tag (lower case) -> result "type" in Label Studio's JSON
CONTROL_TYPES = {"choices": "choices", "rectanglelabels": "rectanglelabels"}
MAX_CONFIG_CHARS = 1_000_000


class UnsupportedConfig(ValueError):
    """The label config cannot be mapped to a prelabel project; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class LabelMapping:
    """The one control prelabel answers for, and the image it reads."""

    task: str  # multiclass | multilabel | detection
    from_name: str  # the control's name
    to_name: str  # the Image tag's name
    type: str  # result type: choices | rectanglelabels
    data_key: str  # task data key holding the image URL ($image -> "image")
    labels: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored with the link)."""
        return {**asdict(self), "labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelMapping:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "labels": tuple(data["labels"])})


def _values(control: Element, child: str) -> tuple[str, ...]:
    out: list[str] = []
    for node in control.iter():
        if node.tag.lower() == child:
            value = node.get("value")
            if value is None or not value.strip():
                raise UnsupportedConfig("invalid_label_config",
                                        f"a <{node.tag}> of {control.get('name')!r} has no value")
            if len(value) > 100:
                raise UnsupportedConfig("invalid_label_config",
                                        f"label {value[:40]!r}... is over 100 characters")
            if value not in out:
                out.append(value)
    return tuple(out)


def parse_label_config(xml: str) -> LabelMapping:
    """Map a label config to a prelabel task (raises :class:`UnsupportedConfig`).

    Supported: one ``<Image>`` with one ``<Choices>`` (single choice -> multiclass,
    ``choice="multiple"`` -> multilabel) or one ``<RectangleLabels>`` (detection). Other
    controls that do not point at that image (text areas, ratings of other objects) are left
    to the annotators.
    """
    if not xml or not xml.strip():
        raise UnsupportedConfig("invalid_label_config", "the label config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise UnsupportedConfig("invalid_label_config", "the label config is too long")
    try:
        root = ElementTree.fromstring(xml)
    except (ElementTree.ParseError, DefusedXmlException) as exc:
        raise UnsupportedConfig("invalid_label_config",
                                f"the label config is not valid XML: {exc}") from exc
    images = {n.get("name"): n for n in root.iter() if n.tag.lower() == "image" and n.get("name")}
    if not images:
        raise UnsupportedConfig("unsupported_label_config",
                                "the label config has no <Image> tag: prelabel labels images")
    controls = [n for n in root.iter() if n.tag.lower() in CONTROL_TYPES
                and n.get("toName") in images]
    if not controls:
        raise UnsupportedConfig(
            "unsupported_label_config",
            "no <Choices> or <RectangleLabels> points at an <Image>: prelabel suggests image "
            "tags (Choices) or boxes (RectangleLabels)")
    if len(controls) > 1:
        names = ", ".join(f"<{c.tag} name={c.get('name')!r}>" for c in controls)
        raise UnsupportedConfig("unsupported_label_config",
                                f"prelabel pre-labels one control per project, found {names}")
    control = controls[0]
    kind = control.tag.lower()
    if not control.get("name"):
        raise UnsupportedConfig("invalid_label_config", f"<{control.tag}> has no name")
    image = images[control.get("toName")]
    value = image.get("value") or ""
    if not value.startswith("$") or len(value) < 2:
        raise UnsupportedConfig("unsupported_label_config",
                                f"<Image name={image.get('name')!r}> must read a task field "
                                f"(value=\"$image\"), not {value!r}")
    if kind == "choices":
        labels = _values(control, "choice")
        task = "multilabel" if control.get("choice", "single") == "multiple" else "multiclass"
    else:
        labels = _values(control, "label")
        task = "detection"
    if len(labels) < (1 if task == "detection" else 2):
        raise UnsupportedConfig("unsupported_label_config",
                                f"<{control.tag} name={control.get('name')!r}> needs "
                                f"{'a label' if task == 'detection' else 'two choices'} at least")
    return LabelMapping(task=task, from_name=str(control.get("name")),
                        to_name=str(control.get("toName")), type=CONTROL_TYPES[kind],
                        data_key=value[1:], labels=labels)
