"""The results folder of one run: checked before any work, locked while the run lives, and replaced
atomically as far as the user can see.

- :func:`check` only reads: a file in the folder's place, a folder holding a run without
  ``run.resume``/``run.overwrite``, a parent that cannot be written, and (:func:`check_finished``) a
  resumed run that is already finished are all refused before anything is created or removed.
- :func:`claim` (a context manager) creates what is missing, takes an exclusive ``flock`` on
  ``<output_dir>/.fedpers-run.lock`` (non-blocking: a second run into the same folder is refused with the
  holder's pid, host and start time, which the lock file holds), and with ``run.overwrite`` moves the old
  run aside into a sibling temporary folder. The old run is deleted once the new run has finished its
  first round (:func:`first_round_done`, called by the round loop); if the run fails before that, the
  old run is moved back and whatever the claim created is removed, so a refused or failed start leaves
  the folder as it found it. The lock file itself stays (deleting it would let a third run lock a new
  file while a second still waits on the old one); the lock is released when the run ends.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedpers.config import ConfigError, ExperimentConfig

LOCK_NAME = ".fedpers-run.lock"
# Files whose presence means the folder holds (part of) a run: a fresh run would replace them.
RUN_FILES = ("checkpoint.pt", "summary.json", "metrics.jsonl")


class AlreadyFinished(Exception):
    """``run.resume=true`` on a run that finished all of ``run.rounds``: nothing to do, nothing touched."""

    def __init__(self, out: Path, rounds: int, summary: dict):
        self.out, self.rounds, self.summary = out, rounds, summary
        super().__init__(
            f"{out} holds a finished run ({rounds} of run.rounds={rounds} rounds, summary.json "
            f"written); nothing was changed. To train it further, resume with a larger run.rounds"
        )


def holds_run(out: Path) -> list[str]:
    """The run files ``out`` holds (an empty metrics.jsonl, left by a run stopped before round 1, is none)."""
    found = []
    for name in RUN_FILES:
        p = out / name
        if p.is_file() and (name != "metrics.jsonl" or p.stat().st_size > 0):
            found.append(name)
    return found


def check(cfg: ExperimentConfig, overwrite: bool = False) -> None:
    """Refuse, without touching anything, a run whose results folder it may not write into. The folder is
    resolved first: ``RUN/x/..`` or a symlink to ``RUN`` is RUN, and is guarded as RUN."""
    out = Path(cfg.run.output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError("run.output_dir", f"{out} exists and is not a folder")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("run.output_dir", f"{out} is not a writable folder ({existing} cannot be written)")
    found = holds_run(out) if out.is_dir() else []
    if found and not (cfg.run.resume or cfg.run.overwrite or overwrite):
        raise ConfigError(
            "run.output_dir",
            f"{out} already holds a run ({', '.join(found)}); set "
            f"run.resume=true to continue it, run.overwrite=true to replace it, "
            f"or choose another run.output_dir",
        )


def check_finished(cfg: ExperimentConfig, checkpoint_round: int) -> None:
    """``run.resume=true`` on a run whose checkpoint is at ``run.rounds`` and whose summary.json is written
    raises :class:`AlreadyFinished` (a larger ``run.rounds`` extends the run instead)."""
    out = Path(cfg.run.output_dir)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return  # not finished: e.g. stopped after the last round, before the summary was written
    if checkpoint_round == cfg.run.rounds and isinstance(summary, dict):
        raise AlreadyFinished(out, checkpoint_round, summary)


def holder(out: Path) -> str:
    """Who holds the lock of ``out``, as its lock file says."""
    try:
        text = (Path(out) / LOCK_NAME).read_text().strip()
    except OSError:
        text = ""
    return text or "another process (the lock file says no more)"


class Claim:
    """One run's hold on its results folder (see the module docstring)."""

    def __init__(self, out: Path):
        self.out = out
        self.created: list[Path] = []  # folders this claim made, outermost first
        self.before: set[str] = set()
        self.moved: list[str] = []
        self.aside: Path | None = None
        self.fd: int | None = None
        self.committed = False

    def acquire(self, cfg: ExperimentConfig, overwrite: bool) -> None:
        try:
            self._make_folders()
            self.before = set(os.listdir(self.out))
            self._lock()
            check(cfg, overwrite)  # again, under the lock: a run may have finished there since the first check
            if holds_run(self.out) and (cfg.run.overwrite or overwrite) and not cfg.run.resume:
                self._move_old_run_aside()
        except BaseException:
            self.rollback()
            self.release()
            raise

    def _make_folders(self) -> None:
        missing, p = [], self.out
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            for d in reversed(missing):
                try:
                    os.mkdir(d)
                except FileExistsError:
                    continue  # made by someone else meanwhile: not ours to remove
                self.created.append(d)
            with tempfile.NamedTemporaryFile(dir=self.out, prefix=".write-test-"):
                pass
        except OSError as e:
            raise ConfigError("run.output_dir", f"{self.out} is not a writable folder: {e.strerror or e}") from None

    def _lock(self) -> None:
        path = self.out / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                "run.output_dir",
                f"{self.out} is in use by another run: {holder(self.out)}; wait "
                f"for it to end or choose another run.output_dir",
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # its holder removed the folder (a failed start) between our open and our lock
            os.close(fd)
            raise ConfigError("run.output_dir", f"{self.out} was removed while this run was starting; run it again")
        self.fd = fd
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)

    def _move_old_run_aside(self) -> None:
        parent = self.out.resolve().parent
        try:
            self.aside = Path(tempfile.mkdtemp(dir=parent, prefix=f".{self.out.name}.replaced-"))
        except OSError as e:
            raise ConfigError(
                "run.output_dir", f"cannot move the old run aside in {parent}: {e.strerror or e}"
            ) from None
        for name in sorted(os.listdir(self.out)):
            if name != LOCK_NAME:
                os.rename(self.out / name, self.aside / name)
                self.moved.append(name)

    def commit(self) -> None:
        """The new run has written its first round: the old one (moved aside) can go."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None
        self.committed = True

    def rollback(self) -> None:
        """Before the first round: remove what this claim created and put the old run back."""
        if self.created:
            if self.fd is not None:  # locked: nobody else is in there
                shutil.rmtree(self.created[0], ignore_errors=True)
            else:  # never locked (another run holds it, or the folder is not writable): empty folders only
                for d in reversed(self.created):
                    try:
                        os.rmdir(d)
                    except OSError:
                        break
            return
        if not self.out.is_dir():
            return
        for name in os.listdir(self.out):
            if name in self.before and name not in self.moved:
                continue
            if name == LOCK_NAME and self.fd is None:
                continue  # not ours: someone else's lock file
            p = self.out / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        if self.aside is not None:
            for name in self.moved:
                os.rename(self.aside / name, self.out / name)
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


_ACTIVE: dict[str, Claim] = {}


def _key(out) -> str:
    return os.fspath(Path(out).resolve())


@contextmanager
def claim(cfg: ExperimentConfig, overwrite: bool = False) -> Iterator[Claim]:
    """Hold ``run.output_dir`` for the run inside the ``with`` block (see the module docstring)."""
    c = Claim(Path(cfg.run.output_dir).resolve())
    c.acquire(cfg, overwrite)
    key = _key(c.out)
    _ACTIVE[key] = c
    try:
        yield c
    except BaseException:
        if not c.committed:
            c.rollback()
        raise
    else:
        c.commit()
    finally:
        _ACTIVE.pop(key, None)
        c.release()


def first_round_done(output_dir) -> None:
    """Called by the round loop once a round is recorded: the run has started writing results, so a
    replaced run is deleted now and a later failure keeps this run's folder (resumable) instead."""
    c = _ACTIVE.get(_key(output_dir))
    if c is not None and not c.committed:
        c.commit()
