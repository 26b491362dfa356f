"""Training policy: when a project is due for a (re)training run."""

from __future__ import annotations

import math
from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.settings import Settings
from service.tables import Annotation, Image, Project, ProjectClass, TrainingRun

ACTIVE = ("QUEUED", "RUNNING")


def label_counts(session: Session, project_id: int) -> tuple[int, Counter[str]]:
    """Labeled images and, per class, the images currently labeled with it."""
    tags = session.scalars(
        select(Annotation.tags).where(
            Annotation.project_id == project_id, Annotation.is_current.is_(True)
        )
    ).all()
    per_class: Counter[str] = Counter()
    for row in tags:
        per_class.update(set(row or ()))
    return len(tags), per_class


def min_labels(project: Project, settings: Settings) -> int:
    """Labeled images each class needs before the first automatic run."""
    if project.task == "detection":
        return settings.min_labels_per_class_detection
    return settings.min_labels_per_class


def is_due(project: Project, classes: list[str], total: int, per_class: Counter[str],
           settings: Settings) -> bool:
    """Every class has the minimum, and enough labels arrived since the last run."""
    if not classes or any(per_class[c] < min_labels(project, settings) for c in classes):
        return False
    if project.labels_at_last_run == 0:
        return True
    needed = max(settings.retrain_after_new_labels,
                 math.ceil(settings.retrain_after_fraction * project.labels_at_last_run))
    return total - project.labels_at_last_run >= needed


def queued_run(session: Session, project_id: int) -> TrainingRun | None:
    """The project's queued run, if any."""
    return session.scalar(
        select(TrainingRun).where(TrainingRun.project_id == project_id,
                                  TrainingRun.status == "QUEUED")
    )


def create_run(session: Session, project: Project, trigger: str, settings: Settings,
               total_labels: int | None = None) -> TrainingRun | None:
    """Add a QUEUED run in the caller's transaction; None if one is queued already."""
    if queued_run(session, project.id) is not None:
        return None
    if total_labels is None:
        total_labels = session.scalar(
            select(func.count()).select_from(Image).where(
                Image.project_id == project.id, Image.labeled.is_(True))
        ) or 0
    run = TrainingRun(project_id=project.id, status="QUEUED", trigger=trigger,
                      max_attempts=settings.max_train_attempts)
    try:
        with session.begin_nested():
            session.add(run)
            session.flush()
    except IntegrityError:  # a concurrent request queued one first (unique partial index)
        return None
    project.labels_at_last_run = total_labels
    return run


def maybe_queue_run(session: Session, project: Project, settings: Settings) -> TrainingRun | None:
    """Queue an automatic run if the policy says one is due (caller commits, then enqueues)."""
    classes = list(session.scalars(
        select(ProjectClass.name).where(ProjectClass.project_id == project.id)))
    total, per_class = label_counts(session, project.id)
    if not is_due(project, classes, total, per_class, settings):
        return None
    return create_run(session, project, "auto", settings, total_labels=total)
