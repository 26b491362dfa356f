"""``prelabel simulate``: sessions for each order on one dataset, against a running prelabel or
one started for the purpose, with the step logs, the summary and the plots written out."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from service.simulate.client import Client, SimulationError
from service.simulate.report import (
    CONFIDENCE_CUTS,
    Costs,
    compare_orders,
    confident_text,
    fewer_text,
    fmt,
    plot,
    summarize,
)
from service.simulate.run import LISTED_ORDERS, SimConfig, Simulation, split_holdout
from service.simulate.truth import load_truth


def group_alive(pgid: int) -> bool:
    """True while any process of the process group ``pgid`` is alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def embedded_server(env: dict[str, str] | None = None,
                    timeout: float = 300) -> Iterator[tuple[str, str]]:
    """``prelabel serve`` (API + worker) in a temporary data folder: (url, admin key).

    The server runs in a session of its own, so it is stopped here also when this process is
    told to stop (SIGTERM becomes SystemExit while the server runs), not only on Ctrl-C.
    """
    key = "sim-" + secrets.token_urlsafe(24)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="prelabel-simulate-") as tmp:
        log_path = Path(tmp) / "serve.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("PRELABEL_")}
        child_env.update({"PRELABEL_DATA_DIR": str(Path(tmp) / "data"),
                          "PRELABEL_ADMIN_KEY": key, "PYTHONUNBUFFERED": "1", **(env or {})})
        with log_path.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port",
                                     str(port)], env=child_env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main else None
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise SimulationError(f"prelabel serve exited:\n{log_path.read_text()[-3000:]}")
                try:
                    ready = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    ready = False
                if ready and " ready." in log_path.read_text(errors="replace"):
                    break
                if time.monotonic() > deadline:
                    raise SimulationError("prelabel serve did not get ready")
                time.sleep(0.3)
            yield url, key
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def simulate(url: str, key: str, dataset: Path, fmt: str, task: str, orders: Sequence[str],
             out_dir: Path, config: SimConfig, costs: Costs, holdout: float = 0.2,
             after_labels: int | None = None, title: str | None = None) -> dict[str, Any]:
    """Run one session per order and write ``<order>.jsonl``, ``summary.json``,
    ``summary.md`` and ``curves.png`` into ``out_dir``; returns the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    client = Client(url, key)
    try:
        classes, truth, report = load_truth(client, dataset, fmt, task)
        pool, held = split_holdout(truth, holdout, config.seed)
        after = after_labels if after_labels is not None else (
            50 if task == "detection" else 5 * len(classes))
        sessions = []
        for order in orders:
            cfg = SimConfig(**{**config.__dict__, "order": order})
            sessions.append(Simulation(client, task, classes, pool, held, cfg,
                                       out_dir / f"{order}.jsonl").run())
    finally:
        client.close()
    summary: dict[str, Any] = {
        "dataset": str(dataset), "format": fmt, "task": task, "classes": classes,
        "images": len(truth), "import_problems": report.get("problems", [])[:20],
        "ground_truth_runs_cancelled": report["ground_truth_runs_cancelled"],
        "seed": config.seed, "holdout_share": holdout,
        "sessions": [summarize(s, costs, after) for s in sessions]}
    by_order = {s.order: s for s in sessions}
    if "random" in by_order:
        summary["vs_random"] = {order: compare_orders(by_order[order], by_order["random"])
                                for order in LISTED_ORDERS if order in by_order}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(markdown(summary, title or dataset.name))
    plot(sessions, title or dataset.name, out_dir / "curves.png")
    return summary


def markdown(summary: dict[str, Any], title: str) -> str:
    """The summary as a Markdown table (one column per order)."""
    sessions = summary["sessions"]
    detection = summary["task"] == "detection"
    rows = [
        ("labels given", lambda s: fmt(s["labels"])),
        ("labels until suggestions first appear",
         lambda s: fmt(s["labels_until_first_suggestion"])),
        ("suggestions accepted unchanged, after the first model",
         lambda s: fmt(s["accepted_after_first_model"], True)),
        (f"... after {sessions[0].get('after_labels')} labels",
         lambda s: fmt(s.get("accepted_after"), True)),
    ]
    if detection:
        rows.append(("boxes accepted unchanged, after the first model",
                     lambda s: fmt(s.get("boxes_unchanged_after_first_model"), True)))
        rows.append((f"... after {sessions[0].get('after_labels')} labels",
                     lambda s: fmt(s.get("boxes_unchanged_after"), True)))
    else:
        rows.append((f"images that got a suggestion, after {sessions[0].get('after_labels')} "
                     "labels", lambda s: fmt(s.get("suggested_after"), True)))
        rows.append((f"images accepted unchanged (of all), after "
                     f"{sessions[0].get('after_labels')} labels",
                     lambda s: fmt(s.get("images_accepted_after"), True)))
        for i, cut in enumerate(CONFIDENCE_CUTS):
            rows.append((f"... of those, at confidence >= {cut}: share shown, accepted",
                         lambda s, i=i: confident_text(s["accepted_by_confidence"][i])))
    rows.append(("annotator time saved (cost model)",
                 lambda s: fmt(s["annotator_seconds"]["saved_share"], True)))
    cps = sorted({c["labels_per_class"] for s in sessions for c in s["checkpoints"]})
    metric = "mAP@.5" if detection else "accuracy"
    for k in cps:
        rows.append((f"{metric} after {k} labels per class",
                     lambda s, k=k: fmt(next((c["metric"] for c in s["checkpoints"]
                                               if c["labels_per_class"] == k), None))))
    rows.append(("wall time (s), of which training waits",
                 lambda s: f"{s['seconds']:.0f}, {s['training_wait_s']:.0f}"))
    lines = [f"## {title}", "",
             f"{summary['images']} labeled images, {len(summary['classes'])} classes "
             f"({summary['task']}); {summary['holdout_share']:.0%} held out for the metric.", "",
             "| | " + " | ".join(s["order"] for s in sessions) + " |",
             "|---|" + "---:|" * len(sessions)]
    lines += [f"| {name} | " + " | ".join(get(s) for s in sessions) + " |" for name, get in rows]
    for order, cmp in summary.get("vs_random", {}).items():
        if cmp.get("target") is None:
            continue
        lines += ["", f"Random order's final {metric} {cmp['target']:.3f} "
                  f"(first reached at {cmp['baseline_labels_to_target']} labels); {order} "
                  f"order reached it at {fmt(cmp['active_labels_to_target'])} labels "
                  f"({fewer_text(cmp['fewer_labels_share'])})."]
    return "\n".join(lines) + "\n"
