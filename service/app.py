"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from service.api import annotations, datasets, health, images, projects, suggestions, training
from service.context import build_context
from service.errors import install_error_handlers
from service.labelstudio.routes import build_router as labelstudio_router
from service.limits import BodySizeLimit
from service.schemas import ERROR_RESPONSES
from service.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing heavy (models, engines) is loaded until first use."""
    settings = settings or get_settings()
    app = FastAPI(
        title="prelabel",
        version="0.1.0",
        description="ML-assisted pre-labeling: suggested tags with confidences for your images.",
    )
    app.state.ctx = build_context(settings)
    install_error_handlers(app)
    for module in (health, projects, images, annotations, suggestions, training, datasets):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    app.include_router(labelstudio_router(settings.labelstudio_prefix), responses=ERROR_RESPONSES)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes,
                       larger={datasets.IMPORT_PATH: settings.max_import_bytes})
    return app
