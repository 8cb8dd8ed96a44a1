"""How many cores this process may use (no torch import: data-preparation workers use it too)."""
import os
from concurrent.futures import ProcessPoolExecutor


def usable_cpus() -> int:
    """Cores this process may run on: a container, Slurm job or `taskset` often allows fewer than the machine has,
    and os.cpu_count() counts the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def map_files(fn, jobs: list, workers: int | None = None) -> list:
    """[fn(job) for job in jobs], in parallel processes when there are enough jobs to pay for starting them (photo
    decoding dominates on real collections); `fn` must be a module-level function so the processes can import it."""
    workers = workers or min(usable_cpus(), 8)
    if workers > 1 and len(jobs) >= 64:
        with ProcessPoolExecutor(workers) as pool:
            return list(pool.map(fn, jobs, chunksize=16))
    return [fn(job) for job in jobs]
