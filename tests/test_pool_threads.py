"""Pool processes of the worker survive the fork: torch work in them does not hang."""

from __future__ import annotations

import multiprocessing

import torch

from workers.tasks import one_intra_op_thread


def _pool_process() -> None:
    one_intra_op_thread()  # what Celery runs first in each pool process
    (torch.rand(2000, 2000) + 1).sum()  # large enough to run in parallel


def test_pool_process_runs_torch_after_the_parent_used_threads() -> None:
    """Celery forks its pool from the worker's main process. Once that process has run a
    multi-threaded torch op, a forked child's first one hangs unless the child is told to use
    one thread (what the GPU path did: CPU training pins one thread itself)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (torch.rand(2000, 2000) + 1).sum()  # the parent's thread pool now exists
        fork = multiprocessing.get_context("fork")
        child = fork.Process(target=_pool_process)
        child.start()
        child.join(timeout=60)
        hung = child.is_alive()
        if hung:
            child.kill()
        assert not hung and child.exitcode == 0
    finally:
        torch.set_num_threads(previous)
