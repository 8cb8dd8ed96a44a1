"""How many cores this process may use (no torch import: data-preparation workers use it too)."""
import os


def usable_cpus() -> int:
    """Cores this process may run on: a container, Slurm job or `taskset` often allows fewer than the machine has,
    and os.cpu_count() counts the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
