"""One typed settings object, read once from the environment (prefix ``PRELABEL_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service settings; every field can be set as ``PRELABEL_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="PRELABEL_", env_file=None, extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("./data")
    database_url: str = ""  # empty: SQLite file in data_dir
    broker_url: str = ""  # empty: embedded filesystem broker under data_dir; else e.g. redis://
    storage_dir: Path | None = None  # blob store folder; empty: data_dir/blobs
    cache_dir: Path | None = None  # derived files (exported backbone); empty: data_dir/cache
    device: Literal["auto", "cpu", "cuda"] = "auto"

    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str = ""  # first admin key; empty: one is generated and shown once

    max_upload_bytes: int = 20 * 1024 * 1024  # whole request body
    max_image_pixels: int = 50_000_000
    max_files_per_upload: int = 256
    max_batch_suggestions: int = 256

    min_labels_per_class: int = 5
    min_labels_per_class_detection: int = 15  # images containing the class (Custom Vision's)
    max_boxes_per_image: int = 500
    retrain_after_new_labels: int = 10  # absolute floor of new labels before an automatic retrain
    retrain_after_fraction: float = 0.2  # ...or this share of the labels the last run saw
    max_train_attempts: int = 2  # a killed run is retried once, then FAILED (worker_lost)
    lease_seconds: int = 30  # DB lease on a running run; heartbeats renew it
    reconcile_interval_seconds: int = 10
    requeue_after_seconds: int = 60  # re-send QUEUED runs / unembedded images older than this
    # time budget of one detector training run; 0: none, the run ends at detection_max_epochs
    # (or early stopping), so it gives the same detector on a slow machine as on a fast one
    detection_train_seconds: float = Field(900, ge=0)
    detection_max_epochs: int = Field(40, ge=1)
    # re-classify detected boxes from crops when that wins on the held-out images (costs up to
    # ~10 ms per box at serving; models/box_classifier.py)
    detection_crop_stage: bool = True
    detection_crop_min_gain: float = 0.02  # held-out mAP@.5 gain the crop stage must show
    # > 0: a multiclass suggestion is made only at a confidence where the model's held-out
    # top-class predictions were right this often (fewer, surer pre-fills); 0: always
    suggestion_min_precision: float = Field(0.0, ge=0.0, le=1.0)
    # train the frozen head also on turned, reframed and mirrored views of each labeled image
    # (models/views.py); off where those change the label (e.g. left/right, orientation)
    head_views: bool = True
    # average a frozen head's probabilities over each image and four of those views (embedded
    # once per image at upload: 5 backbone passes instead of 1); off with head_views' reasons
    # or where upload throughput matters more than 2-3 points of accuracy
    prediction_views: bool = True
    finetune: bool = True  # try fine-tuning the top of the backbone once classes have many labels

    # dataset import/export (archives are checked before anything is extracted)
    max_import_bytes: int = 2 * 1024**3  # uploaded archive (the import route's body limit)
    max_import_uncompressed_bytes: int = 8 * 1024**3  # all members together, as declared
    max_import_member_bytes: int = 1024**3  # one member, as declared
    max_import_files: int = 200_000  # members of one archive

    # Label Studio ML backend (service/labelstudio): where relative image paths
    # (/data/upload/...) are fetched from, with which key (legacy token or personal access
    # token), and which other hosts http(s) image URLs may name (comma-separated host[:port]).
    # Nothing else is fetched: an image URL is a request the service makes for a caller.
    labelstudio_prefix: str = "/labelstudio"
    labelstudio_url: str = ""
    labelstudio_api_key: str = ""
    labelstudio_allowed_hosts: str = ""
    labelstudio_username: str = ""  # HTTP Basic auth on the backend routes when both are set
    labelstudio_password: str = ""
    labelstudio_fetch_timeout_s: float = 20.0

    worker_concurrency: int = 2
    onnx_threads: int = 0  # 0: onnxruntime's default

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.environment == "production":
            if not self.database_url or self.database_url.startswith("sqlite"):
                raise ValueError("production needs PRELABEL_DATABASE_URL (PostgreSQL)")
            if not self.broker_url:
                raise ValueError("production needs PRELABEL_BROKER_URL (e.g. redis://...)")
            if self.labelstudio_username and len(self.labelstudio_password) < 12:
                raise ValueError("PRELABEL_LABELSTUDIO_PASSWORD must be at least 12 characters "
                                 "in production")
            if self.admin_key and len(self.admin_key) < 24:
                raise ValueError("PRELABEL_ADMIN_KEY must be at least 24 characters in production")
        return self

    @property
    def db_url(self) -> str:
        """The database URL, defaulting to an SQLite file in the data folder."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'prelabel.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        """Folder of the local blob store."""
        return (self.storage_dir or self.data_dir / "blobs").resolve()

    @property
    def cache_path(self) -> Path:
        """Folder of derived, re-creatable files."""
        return (self.cache_dir or self.data_dir / "cache").resolve()

    @property
    def embedded_broker(self) -> bool:
        """True when no broker server is configured (filesystem transport)."""
        return not self.broker_url

    @property
    def broker_dir(self) -> Path:
        """Folder used by the embedded filesystem broker."""
        return (self.data_dir / "broker").resolve()


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
