"""Worker processes that do not outlive their driver.

A sweep's ``--jobs`` workers and the fast engine's ``run.workers`` are spawned processes. Python's default
SIGTERM ends a driver at once, and a SIGKILLed or crashed driver runs no cleanup at all; either way its
workers would go on as orphans, training cells whose results nobody reads, on the cores a resumed run needs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time


def watch_parent(parent_pid: int, every_s: float = 1.0) -> threading.Thread:
    """Start a daemon thread that ends this process (exit code 1) once ``parent_pid`` is no longer its
    parent, i.e. the driver is gone; call it in a worker's initializer with the driver's pid."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os._exit(1)

    t = threading.Thread(target=watch, daemon=True, name="parent-watch")
    t.start()
    return t


@contextlib.contextmanager
def sigterm_raises():
    """Within the block, SIGTERM (``kill``, a scheduler's stop) raises ``SystemExit(143)`` in the main
    thread like Ctrl-C raises KeyboardInterrupt, so ``finally``/``except`` blocks stop the workers. Off the
    main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
