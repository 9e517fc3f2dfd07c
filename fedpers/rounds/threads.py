"""How many torch intra-op threads a fedpers process uses (``run.threads``).

Why a policy at all: torch starts one OpenMP thread per core, and each parallel region ends in a
barrier where every thread waits for the slowest. When another process holds a core, one of our threads
is descheduled at every barrier and the others spin for it: on a 2-core machine beside one busy process,
a default round took about 7x longer with 2 threads than with 1. One thread per core is right only for
cores nobody else uses.

The policy, in order:

1. ``run.threads > 0``: exactly that many threads per process (the user's word).
2. ``OMP_NUM_THREADS`` set in the environment: that many (the usual way to pin threads).
3. auto: the cores this process may use (its CPU affinity) minus the cores other processes keep busy,
   divided by ``jobs`` (processes of fedpers sharing the machine: sweep jobs or fast-engine workers),
   at least 1. "Busy" is read from ``/proc/stat`` minus this process's own CPU time, over a short sample
   at start and then over each round (the fast engine re-checks between rounds, so a run adapts when a
   neighbour starts or stops). A core counts as free only when at least 75% of it is idle, because a
   half-busy core still stalls every barrier. Where ``/proc/stat`` does not exist, every core counts
   as free.

``python -m fedpers.bench --only P8`` measures the policy: round time beside one CPU-bound process
divided by the same on an idle machine, for auto and for 1 thread.
"""

from __future__ import annotations

import logging
import math
import os
import time

log = logging.getLogger("fedpers")

# A core is free when its idle share is at least this: 0.75 means one more thread is started only when
# the sampled window left three quarters of a core unused by other processes.
FREE_CORE_IDLE = 0.75


def cpu_count() -> int:
    """Cores this process may run on (affinity, then a cgroup CPU quota), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:  # cgroup v2 quota, e.g. "200000 100000" = 2 cores; "max" = no quota
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _cpu_times() -> tuple[float, float, float] | None:
    """(seconds all CPUs were busy, seconds of wall time x cores, this process's CPU seconds), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user time
    t = os.times()
    return (total - idle) / hz, total / hz, t.user + t.system


class BusyMeter:
    """Cores kept busy by *other* processes since the last reading."""

    def __init__(self):
        self._last = _cpu_times()

    def others_busy(self) -> float | None:
        now = _cpu_times()
        if now is None or self._last is None:
            return None
        busy, total, own = (a - b for a, b in zip(now, self._last))
        self._last = now
        if total <= 0:
            return None
        # /proc/stat sums every core the kernel has: wall time = total / cores_in_proc_stat.
        return max(0.0, (busy - own) * _proc_stat_cores() / total)


def _proc_stat_cores() -> int:
    try:
        with open("/proc/stat") as f:
            return max(1, sum(1 for line in f if line.startswith("cpu") and line[3].isdigit()))
    except OSError:
        return os.cpu_count() or 1


def choose(cores: int, others_busy: float | None, jobs: int = 1) -> int:
    """The auto rule: free cores (idle share >= FREE_CORE_IDLE) split among ``jobs``, at least 1."""
    if others_busy is None:
        free = cores
    else:
        free = min(cores, math.floor(cores - others_busy + (1 - FREE_CORE_IDLE)))
    return max(1, free // max(1, jobs))


def explicit_threads(requested: int = 0) -> int | None:
    """The thread count the user fixed (``run.threads``, then ``OMP_NUM_THREADS``), or None for auto."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return None


_meter: BusyMeter | None = None  # this process's reading since the last decision (or since first use)
_meter_t = 0.0


def prime() -> None:
    """Start this process's load reading now, so the first decision samples the seconds until then
    (``simulate.run`` calls it before building the data) instead of waiting ``sample_s``."""
    global _meter, _meter_t
    if _meter is None:
        _meter, _meter_t = BusyMeter(), time.monotonic()


def torch_threads(jobs: int = 1, requested: int = 0, sample_s: float = 0.25) -> int:
    """Threads each of ``jobs`` fedpers processes should give torch now (rules in the module docstring).
    A sweep that runs N cells at once calls ``torch_threads(jobs=N)`` and passes the result to each cell
    as ``run.threads``. The load is read over the time since the previous call in this process (loading
    data and the backbone in between is a long enough sample), waiting only for a first call's
    ``sample_s``."""
    global _meter_t
    fixed = explicit_threads(requested)
    if fixed is not None:
        return fixed
    prime()
    wait = sample_s - (time.monotonic() - _meter_t)
    if wait > 0:
        time.sleep(wait)
    others = _meter.others_busy() if _meter is not None else None
    _meter_t = time.monotonic()
    return choose(cpu_count(), others, jobs)


class ThreadPolicy:
    """Sets torch's intra-op threads for this process, and re-checks between rounds when auto."""

    def __init__(self, requested: int = 0, jobs: int = 1):
        import torch

        self.jobs = jobs
        self.fixed = explicit_threads(requested)
        self.threads = self.fixed or torch_threads(jobs)
        self._meter = None if self.fixed else BusyMeter()
        torch.set_num_threads(self.threads)
        log.debug("torch threads: %d (%s)", self.threads, "fixed" if self.fixed else "auto")

    def update(self) -> int:
        """Between rounds: follow the other processes' load over the round that just ended (auto only)."""
        if self._meter is None:
            return self.threads
        n = choose(cpu_count(), self._meter.others_busy(), self.jobs)
        if n != self.threads:
            import torch

            log.debug("torch threads: %d -> %d (other processes' load changed)", self.threads, n)
            torch.set_num_threads(n)
            self.threads = n
        return self.threads
