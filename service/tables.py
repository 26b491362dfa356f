"""Database tables (SQLAlchemy 2). Never returned to clients directly: see ``schemas``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Timezone-aware now (UTC)."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    """Declarative base of every table."""


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamps stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


Stamp = UTCDateTime


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    task: Mapped[str] = mapped_column(String(20))  # multiclass | multilabel | detection
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)
    # labels counted at the moment the last run was created: the retrain policy compares to it
    labels_at_last_run: Mapped[int] = mapped_column(Integer, default=0)


class ProjectClass(Base):
    __tablename__ = "classes"
    __table_args__ = (UniqueConstraint("project_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("project_id", "sha256"),
        Index("ix_images_project_uncertainty", "project_id", "uncertainty"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(200))  # generated, never user-chosen
    filename: Mapped[str] = mapped_column(String(255))  # display only, never used as a path
    format: Mapped[str] = mapped_column(String(10))
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)  # EXIF-corrected (displayed) frame
    height: Mapped[int] = mapped_column(Integer)
    labeled: Mapped[bool] = mapped_column(Boolean, default=False)
    # latest promoted model's uncertainty on this image (for order=uncertainty)
    uncertainty: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertainty_model_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)


class Embedding(Base):
    __tablename__ = "embeddings"
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    backbone: Mapped[str] = mapped_column(String(80), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)


class Annotation(Base):
    __tablename__ = "annotations"
    __table_args__ = (Index("ix_annotations_image_current", "image_id", "is_current"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)  # class names
    boxes: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    source: Mapped[str] = mapped_column(String(30))
    suggestion_id: Mapped[str | None] = mapped_column(
        ForeignKey("suggestions.id", ondelete="SET NULL"), nullable=True
    )
    author_key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)
    # set on labels written by a dataset import: the format they came from (coco, voc, ...)
    import_format: Mapped[str | None] = mapped_column(String(20), nullable=True)


class Suggestion(Base):
    """A suggestion served for an image by one model version (one row per pair)."""

    __tablename__ = "suggestions"
    __table_args__ = (UniqueConstraint("image_id", "model_id"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)
    # NULL while only precomputed by the worker (detection); set when first sent to a client
    served_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)


class TrainingRun(Base):
    __tablename__ = "training_runs"
    __table_args__ = (
        # at most one queued run per project, enforced by the database itself
        Index(
            "uq_training_runs_one_queued",
            "project_id",
            unique=True,
            sqlite_where=text("status = 'QUEUED'"),
            postgresql_where=text("status = 'QUEUED'"),
        ),
        Index("ix_training_runs_status", "status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(12), default="QUEUED")
    trigger: Mapped[str] = mapped_column(String(12))  # auto | manual
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str] = mapped_column(String(40), default="queued")
    device: Mapped[str | None] = mapped_column(String(20), nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=2)
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(120), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)
    labels_seen: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("project_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    # one version per run: a redelivered task cannot publish a second one
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), unique=True)
    version: Mapped[int] = mapped_column(Integer)
    task: Mapped[str] = mapped_column(String(20))
    classes: Mapped[list[Any]] = mapped_column(JSON)  # output order of the model
    backbone: Mapped[str] = mapped_column(String(80))  # embeddings this model's head reads
    # fine-tuned models carry their own backbone (image -> embedding) artifact
    backbone_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    backbone_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(40))  # frozen_linear | finetuned
    device: Mapped[str] = mapped_column(String(20))
    # the classifier head on cached embeddings; detection models have only the pipeline
    head_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    head_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pipeline_key: Mapped[str] = mapped_column(String(200))
    pipeline_sha256: Mapped[str] = mapped_column(String(64))
    thresholds: Mapped[list[Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    train_image_ids: Mapped[list[Any]] = mapped_column(JSON)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    promotion_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))
    role: Mapped[str] = mapped_column(String(12))  # annotator | operator | admin
    project_id: Mapped[int | None] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), nullable=True
    )
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)


class ImportJob(Base):
    """A dataset import: QUEUED -> RUNNING -> SUCCEEDED | FAILED, with its report."""

    __tablename__ = "import_jobs"
    __table_args__ = (Index("ix_import_jobs_status", "status"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    format: Mapped[str] = mapped_column(String(20))
    options: Mapped[dict[str, Any]] = mapped_column(JSON)  # mapping, create_classes, existing
    origin: Mapped[str] = mapped_column(String(20))  # upload | cli
    source_name: Mapped[str] = mapped_column(String(255))  # display only
    archive_key: Mapped[str | None] = mapped_column(String(200), nullable=True)  # uploads
    status: Mapped[str] = mapped_column(String(12), default="QUEUED")
    stage: Mapped[str] = mapped_column(String(40), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(120), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)
    author_key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(Stamp(), nullable=True)


class LabelStudioLink(Base):
    """A Label Studio project served as an ML backend, and the prelabel project behind it."""

    __tablename__ = "labelstudio_projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    # Label Studio's own key for its project: "<id>.<created_at as a Unix timestamp>"
    ls_project: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    mapping: Mapped[dict[str, Any]] = mapped_column(JSON)  # label_config.LabelMapping
    hostname: Mapped[str | None] = mapped_column(String(500), nullable=True)  # from /setup
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)


class LabelStudioTask(Base):
    """A Label Studio task's image as stored in prelabel (fetched once per URL)."""

    __tablename__ = "labelstudio_tasks"
    __table_args__ = (UniqueConstraint("link_id", "task_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    link_id: Mapped[int] = mapped_column(
        ForeignKey("labelstudio_projects.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    # the Label Studio annotation behind the image's current label (deleting it unlabels)
    annotation_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(Stamp(), default=utcnow)
