"""The fine-tuned candidate: top of the backbone trained on all folds but one.

It is kept only when it beats the frozen head on the held-out fold (both trained on the same
images), so fine-tuning can never make a project's model worse than the cheap one.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from models.finetune import (
    FinetuneCancelled,
    export_embedding_onnx,
    finetune,
)
from models.heads import predict_proba
from models.metrics import choose_thresholds, classification_metrics
from workers.context import WorkerContext
from workers.evaluation import Candidate, score_of
from workers.labeled import LabeledSet, model_inputs

# models.finetune measured fine-tuning winning from 5 labels per class (+6 points on cards), but
# it costs 1-1.5 min of CPU per run on 2 cores, and the first model must serve within seconds
# of the label that crosses the threshold. Until runs publish the frozen model first and
# fine-tune after, the worker tries it only once classes have this many labels.
WORKER_FINETUNE_MIN_LABELS = 15


def embed_with(model: torch.nn.Module, arrays: np.ndarray, batch: int = 64) -> np.ndarray:
    """Embeddings of uint8 model inputs with a torch embedding model (CPU)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(arrays), batch):
            out.append(model(torch.from_numpy(arrays[start:start + batch])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def finetune_candidate(ctx: WorkerContext, session: Session, data: LabeledSet, task: str,
                       classes: list[str], device: torch.device, folds: np.ndarray, k: int,
                       frozen_oof: np.ndarray | None, should_stop: Callable[[], bool],
                       progress: Callable[[float], None]) -> tuple[Candidate | None,
                                                                   dict[str, Any]]:
    """Fine-tune when every labeled class has enough labels; (candidate or None, report)."""
    counts = data.counts(len(classes))
    rarest = int(counts[counts > 0].min()) if (counts > 0).any() else 0
    if not ctx.settings.finetune:
        return None, {"status": "disabled"}
    if frozen_oof is None or k < 2 or rarest < WORKER_FINETUNE_MIN_LABELS:
        return None, {"status": "skipped", "reason": f"needs {WORKER_FINETUNE_MIN_LABELS}+ "
                      f"labels in every labeled class (rarest has {rarest})"}
    hold, fit = np.flatnonzero(folds == 0), np.flatnonzero(folds != 0)
    arrays = model_inputs(ctx, session, data.image_ids)
    try:
        result = finetune(arrays[fit], data.y[fit], task, len(classes), device,  # type: ignore[arg-type]
                          progress=progress, should_stop=should_stop)
    except FinetuneCancelled:
        return None, {"status": "cancelled"}
    probs = predict_proba(result.head, embed_with(result.model, arrays[hold]))
    thresholds = np.full(len(classes), 0.5, np.float32)
    if task == "multilabel":  # the comparison below uses mAP, which thresholds do not change
        thresholds = choose_thresholds(data.y[hold], probs).astype(np.float32)
    result.head.thresholds = thresholds
    ft_score = score_of(task, data.y[hold], probs, classes, thresholds)
    frozen_score = score_of(task, data.y[hold], frozen_oof[hold], classes, thresholds)
    report: dict[str, Any] = {
        "status": "tried", "hold_out_images": len(hold), "finetuned_score": ft_score,
        "frozen_score": frozen_score, "seconds": round(result.seconds, 1),
        "device": result.device}
    if ft_score is None or frozen_score is None or ft_score <= frozen_score:
        report["kept"] = False
        return None, report
    report["kept"] = True
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "backbone.onnx"
        export_embedding_onnx(result.model, path)
        onnx_bytes = path.read_bytes()
    metrics = classification_metrics(task, data.y[hold], probs, classes, thresholds)
    metrics["validation"] = (f"held-out fold of {len(hold)} images (1 of {k}); the model "
                             "trained on the other folds")
    return Candidate("finetuned", result.head, fit, hold, probs, metrics, onnx_bytes), report
