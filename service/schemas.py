"""Request and response bodies of the public API (separate from the DB tables)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

Task = Literal["multiclass", "multilabel", "detection"]
Source = Literal["manual", "suggestion_accepted", "suggestion_corrected"]
RunStatus = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"]
MAX_ID = 2**31 - 1  # ids are 32-bit in every database we support
DbId = Annotated[int, Field(ge=1, le=MAX_ID)]
ClassName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]


class Strict(BaseModel):
    """Request bodies reject unknown fields so typos are not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def _unique(names: list[str]) -> list[str]:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate class name {name!r}")
        seen.add(name)
    return names


class ProjectCreate(Strict):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
    task: Task
    classes: list[ClassName] = Field(default_factory=list, max_length=1000)

    _check_classes = field_validator("classes")(_unique)


class ModelRef(BaseModel):
    id: int
    version: int


class ProjectOut(BaseModel):
    id: int
    name: str
    task: Task
    classes: list[str]
    created_at: datetime
    image_count: int
    labeled_count: int
    promoted_model: ModelRef | None


class ClassCreate(Strict):
    name: ClassName


class ClassOut(BaseModel):
    id: int
    name: str


class UploadedImage(BaseModel):
    id: int
    filename: str
    sha256: str
    width: int
    height: int
    duplicate: bool


class UploadError(BaseModel):
    filename: str
    code: str
    message: str


class UploadResult(BaseModel):
    images: list[UploadedImage]
    errors: list[UploadError]


class ImageOut(BaseModel):
    id: int
    project_id: int
    filename: str
    sha256: str
    format: str
    size_bytes: int
    width: int
    height: int
    labeled: bool
    uncertainty: float | None
    created_at: datetime


class ImagePage(BaseModel):
    items: list[ImageOut]
    next_cursor: str | None


class BoxIn(Strict):
    label: ClassName
    x: float
    y: float
    width: float
    height: float
    polygon: list[tuple[float, float]] | None = None


class AnnotationCreate(Strict):
    tags: list[ClassName] | None = Field(default=None, max_length=1000)
    boxes: list[BoxIn] | None = Field(default=None, max_length=10_000)
    source: Source = "manual"
    suggestion_id: Annotated[str, StringConstraints(max_length=64)] | None = None


class AnnotationOut(BaseModel):
    id: int
    image_id: int
    tags: list[str]
    boxes: list[dict[str, Any]] | None
    source: Source
    suggestion_id: str | None
    author_key_id: int | None
    is_current: bool
    created_at: datetime
    import_format: str | None = Field(
        default=None, description="the dataset format a label was imported from (else null)")


class AnnotationHistory(BaseModel):
    latest: AnnotationOut | None
    history: list[AnnotationOut]


class TagScore(BaseModel):
    label: str
    confidence: float


class TagSuggestion(TagScore):
    below_threshold: bool = Field(False, description="only with include_low=true: a top class "
                                  "under the confidence the model's held-out predictions "
                                  "vouch for (multiclass), so not suggested")


class BoxScore(BaseModel):
    label: str
    confidence: float
    x: float
    y: float
    width: float
    height: float
    below_threshold: bool = Field(False, description="only with include_low=true: a box that is "
                                  "not suggested (under its class's served threshold, or a "
                                  "second class on an object a higher box names)")


class SuggestionOut(BaseModel):
    suggestion_id: str | None
    image_id: int | None
    model_id: int
    model_version: int
    width: int
    height: int
    tags: list[TagSuggestion]
    boxes: list[BoxScore]
    scores: list[TagScore] = Field(description="every class with its confidence, highest first")


class SuggestionBatchIn(Strict):
    image_ids: list[DbId] = Field(min_length=1)


class SuggestionBatchOut(BaseModel):
    items: list[SuggestionOut]


class TrainingRunOut(BaseModel):
    id: int
    project_id: int
    status: RunStatus
    trigger: str
    progress: float
    stage: str
    device: str | None
    attempt: int
    max_attempts: int
    error_code: str | None
    error: str | None
    labels_seen: int | None
    model_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ModelOut(BaseModel):
    id: int
    project_id: int
    run_id: int
    version: int
    kind: str
    device: str
    classes: list[str]
    thresholds: list[float] = Field(description="per class, in `classes` order: the confidence "
                                    "from which a tag (multilabel) or a box (detection) is "
                                    "suggested")
    promoted: bool
    promotion_note: str | None
    metrics: dict[str, Any]
    created_at: datetime


class ClassStats(BaseModel):
    name: str
    labeled_images: int


class AcceptanceStats(BaseModel):
    model_version: int
    model_id: int
    suggestions_served: int
    reviewed: int
    accepted: int
    corrected: int
    acceptance_rate: float | None


class ProjectStats(BaseModel):
    images: int
    labeled: int
    unlabeled: int
    embedded: int
    scored: int = Field(description="unlabeled images the promoted model has scored: their "
                        "uncertainty orders the listing and their suggestion is stored")
    classes: list[ClassStats]
    annotations_by_source: dict[str, int]
    acceptance: list[AcceptanceStats]
    runs_by_status: dict[str, int]


class ApiKeyCreate(Strict):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    role: Literal["annotator", "operator", "admin"]
    project_id: DbId | None = None


class ApiKeyOut(BaseModel):
    id: int
    name: str
    role: str
    prefix: str
    project_id: int | None
    created_at: datetime
    key: str | None = Field(default=None, description="the plain key, returned once at creation")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. image_too_large")
    message: str
    details: dict[str, Any]


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in (
        (401, "missing or invalid API key"), (403, "the key's role does not allow this"),
        (404, "not found (or not visible to this key)"), (409, "conflict with the current state"),
        (413, "request or image too large"), (415, "unsupported media type"),
        (422, "invalid input"), (503, "database or storage unavailable"))
}


ImportFormat = Literal["coco", "voc", "yolo", "azureml", "labelstudio", "folders"]
ExportFormat = Literal["coco", "voc", "yolo", "azureml", "labelstudio", "csv"]
ImportStatus = Literal["QUEUED", "RUNNING", "SUCCEEDED", "FAILED"]


class ImportJobOut(BaseModel):
    id: int
    project_id: int
    format: ImportFormat
    origin: str = Field(description="upload (API) or cli")
    source_name: str
    status: ImportStatus
    stage: str
    progress: float
    counts: dict[str, Any] = Field(description="images, labels, objects and problem counts")
    report: dict[str, Any] | None = Field(
        description="the full report (problems by file and object) once SUCCEEDED; the "
                    "list of a project's imports leaves it out")
    error_code: str | None
    error: str | None
    attempt: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
