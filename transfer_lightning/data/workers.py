"""Tasks over image files, in this process or in worker processes, whichever is quicker, with a progress bar."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from transfer_lightning.logs import progress_bar

#: Seconds of work left, estimated from the first task, above which the rest goes to worker processes. A spawned
#: worker imports torch first: below this, the workers' start-up costs more than it saves (docs/performance.md,
#: "Small trees are decoded in this process").
POOL_MIN_SECONDS = 10.0


def run_tasks(function: Callable[..., list], tasks: list[tuple], description: str) -> list:
    """``function(*task)`` for every task (whose last item lists its images), results concatenated: the first
    task here, and the rest in one process per core (up to 8) when the first one's time says that they would
    take :data:`POOL_MIN_SECONDS` here. ``function`` must be importable by name, for the workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, 8)
    progress = progress_bar(total=sum(len(task[-1]) for task in tasks), desc=description, unit="img")
    results = []
    with progress:
        first, rest = tasks[:1], tasks[1:]
        start, seconds_left = time.perf_counter(), 0.0
        for task in first:
            results.append(function(*task))
            progress.update(len(task[-1]))
            seconds_per_image = (time.perf_counter() - start) / len(task[-1])
            seconds_left = seconds_per_image * sum(len(other[-1]) for other in rest)
        if workers < 2 or seconds_left < POOL_MIN_SECONDS:
            for task in rest:
                results.append(function(*task))
                progress.update(len(task[-1]))
        else:
            # spawn: the parent holds torch's threads, which a forked child must not inherit.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                for task, result in zip(rest, pool.map(function, *zip(*rest, strict=True)), strict=True):
                    results.append(result)
                    progress.update(len(task[-1]))
    return [item for result in results for item in result]
