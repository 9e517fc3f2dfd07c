"""Worker processes stop with their driver: a SIGTERMed or SIGKILLed sweep leaves no orphan training on."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SLOW_CELL = """import os, time
def cell(path):
    open(path + ".tmp", "w").write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(300)
    return "ok", ""
"""

DRIVER = """import sys
sys.path.insert(0, {tmp!r})
import slowcell
from fedpers.sweep.local import run_local
run_local([(0, {a!r}), (1, {b!r})], 2, lambda *a: None, slowcell.cell)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has stopped; only its exit status waits to be collected


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_sweep_workers_stop_when_the_driver_is_killed(tmp_path, sig):
    (tmp_path / "slowcell.py").write_text(SLOW_CELL)
    a, b = str(tmp_path / "a.pid"), str(tmp_path / "b.pid")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(tmp=str(tmp_path), a=a, b=b)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert _wait(lambda: Path(a).exists() and Path(b).exists(), 120), "the cells never started"
        workers = [int(Path(p).read_text()) for p in (a, b)]
        assert all(_alive(w) for w in workers)
        driver.send_signal(sig)
        rc = driver.wait(60)
        assert rc == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGKILL)
        # The cells sleep for 300 s: a worker still alive after 15 s was left running by its driver.
        assert _wait(lambda: not any(_alive(w) for w in workers), 15), [w for w in workers if _alive(w)]
    finally:
        driver.kill()
        for p in (a, b):
            if Path(p).exists() and _alive(pid := int(Path(p).read_text())):
                os.kill(pid, signal.SIGKILL)


def test_watch_parent_leaves_a_worker_alone_while_its_parent_lives():
    from fedpers.rounds.workers import watch_parent

    t = watch_parent(os.getppid(), every_s=0.01)
    time.sleep(0.1)
    assert t.is_alive()  # the pytest process is still here: a watcher that fired would have ended it
