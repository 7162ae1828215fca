"""CPU thread guard for the entry points (CLI, train_erase.py, app.py, benchmarks).

torch's default intra-op pool is one thread per core. That is right for one process on a quiet machine and badly
wrong for two: two generations side by side on 2 cores, each with 2 spinning OpenMP threads, measured far slower
than running them one after the other (benchmarks/bench_threads.py). ``configure_threads()`` picks a count that
does not oversubscribe:

- an explicit setting wins: ``ERASE_DIFFUSION_THREADS=N`` (this module's own knob), else ``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS`` (torch already read them; nothing is changed);
- on a machine with a CUDA device nothing is changed (the heavy work is on the GPU; torch's defaults are fine);
- otherwise: the cores this process may use (``os.sched_getaffinity``, bounded by a cgroup CPU quota), minus the
  tasks already running on them at start (``/proc/loadavg``'s running count, sampled), capped at ``MAX_DEFAULT``
  and at least 1; one inter-op thread.

Importing this module (``erase_diffusion/__init__`` does, first) before torch also sets ``OMP_WAIT_POLICY=PASSIVE``
unless it is set: OpenMP reads it once, when torch loads, and its default (spin while waiting) is what turns a busy
core into a 10-40× slowdown — on a loaded 2-core machine a 2-thread generation measured 46 s spinning and 1.8 s
passive (benchmarks/bench_threads.py records both). Imported after torch, it changes nothing.

``configure_threads`` is meant for ``main()`` functions, called once before heavy torch work; library code never
calls it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager

ENV = "ERASE_DIFFUSION_THREADS"
EXPLICIT_ENVS = (ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS")
MAX_DEFAULT = 4

_done: dict | None = None
# OpenMP's wait policy is read when torch loads: set the default here, before, or not at all
WAIT_POLICY_SET = "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
if WAIT_POLICY_SET:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def available_cores() -> int:
    """Cores this process may run on: the affinity mask, bounded by a cgroup v2/v1 CPU quota when one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    try:
        q, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        return None if q == "max" else int(q) / int(period)
    except (OSError, ValueError):
        pass
    try:
        q = int(open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read())
        period = int(open("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read())
        return None if q <= 0 else q / period
    except (OSError, ValueError):
        return None


def busy_cores(samples: int = 5, interval: float = 0.02) -> int:
    """Other tasks running right now (``/proc/loadavg`` field 4 is 'running/total', this process included); the
    median of a few samples so one transient task does not count. 0 where /proc is missing."""
    counts = []
    for i in range(samples):
        try:
            running = int(open("/proc/loadavg").read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def _explicit_env() -> str | None:
    """The first of ``EXPLICIT_ENVS`` the user set, if any."""
    return next((v for v in EXPLICIT_ENVS if os.environ.get(v, "").strip()), None)


def default_threads(cores: int | None = None, busy: int | None = None) -> int:
    cores = available_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    return max(1, min(MAX_DEFAULT, cores - busy))


def configure_threads(verbose: bool = False) -> dict:
    """Set torch's CPU thread counts for this process (see the module docstring); returns what was decided.

    Idempotent: a second call returns the first decision without touching torch again."""
    global _done
    if _done is not None:
        return _done
    import torch  # here, not at the top: this module sets OMP_WAIT_POLICY before anything imports torch

    explicit = _explicit_env()
    decision: dict = {"source": None, "threads": None, "interop": None,
                      "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)") + (
                          " (set before torch loaded)" if WAIT_POLICY_SET else "")}
    if explicit == ENV:
        n = max(1, int(os.environ[ENV]))
        _set(torch, n)
        decision.update(source=ENV, threads=n, interop=1)
    elif explicit:
        decision.update(source=explicit, threads=torch.get_num_threads())
    elif torch.cuda.is_available():
        decision.update(source="cuda: unchanged", threads=torch.get_num_threads())
    else:
        cores, busy = available_cores(), busy_cores()
        n = default_threads(cores, busy)
        _set(torch, n)
        decision.update(source=f"guard: {cores} cores, {busy} busy", threads=n, interop=1)
    if verbose:
        print(f"threads: {decision['threads']} ({decision['source']}); OMP_WAIT_POLICY {decision['omp_wait_policy']}")
    _done = decision
    return decision


# below this many trainable-model parameters a CPU training step is many small matrices, and intra-op threads cost
# more than they give: the miniature world's CLIPErase run took 63 s on one thread and 106 s on two (2 quiet cores)
SMALL_MODEL_PARAMS = 20_000_000


@contextmanager
def one_thread_if_small(n_params: int, device) -> object:
    """One intra-op thread while a small model trains on the CPU, unless the user set a thread count."""
    import torch  # as in configure_threads: never at this module's import

    if _explicit_env() or str(device) != "cpu" or n_params >= SMALL_MODEL_PARAMS:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set(torch, n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # the inter-op pool already started (some parallel work ran); the intra-op setting holds
        pass
