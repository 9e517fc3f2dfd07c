"""``python -m fedpers.flower.launch SUPERLINK [--config FILE] [--timeout S] [key=value ...]``

Submit the fedpers app to a SuperLink with ``flwr run`` and wait, bounded, for the run to end. Unlike
``flwr run --stream`` (which exits 0 even when the run failed), the exit code says what happened:

  0  the run finished:completed
  1  the run failed or was stopped, the SuperLink is unreachable, or --timeout passed (the run is then
     stopped with ``flwr stop``); the message names which, and how to see the run's log
  2  the config is invalid (checked here before anything is submitted)

``SUPERLINK`` is a connection name from ``$FLWR_HOME/config.toml`` (see docs/deployment.md).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

CLI_TIMEOUT_S = 120.0  # one flwr CLI call (building and uploading the app bundle included)
UNREACHABLE_LIMIT = 5  # consecutive failed status polls before the SuperLink counts as dead


class LaunchError(RuntimeError):
    pass


def _flwr(args: list[str], timeout: float = CLI_TIMEOUT_S) -> dict:
    """Run a flwr CLI command with ``--format json``; its JSON answer, or LaunchError."""
    exe = shutil.which("flwr") or str(Path(sys.executable).with_name("flwr"))
    try:
        proc = subprocess.run([exe, *args, "--format", "json"], capture_output=True, text=True, timeout=timeout,
                              check=False)  # failures are read from its JSON answer
    except subprocess.TimeoutExpired:
        raise LaunchError(f"`flwr {' '.join(args[:2])}` did not answer within {timeout:.0f}s") from None
    except OSError as e:
        raise LaunchError(f"cannot run the flwr CLI ({exe}): {e}") from None
    start = proc.stdout.find("{")
    try:
        out = json.loads(proc.stdout[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        out = {}
    if not out.get("success"):
        msg = out.get("error-message") or proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}"
        raise LaunchError(f"`flwr {' '.join(args[:2])}` failed: {msg.strip()}")
    return out


def run_config_arg(config: str | None, overrides: list[str]) -> str:
    """The single ``--run-config`` string for fedpers' declared keys (``config``, ``overrides``)."""
    parts = [f"overrides={json.dumps(' '.join(shlex.quote(o) for o in overrides))}"]
    if config:
        parts.insert(0, f"config={json.dumps(config)}")
    return " ".join(parts)


def submit(app: str, superlink: str, config: str | None, overrides: list[str]) -> int:
    out = _flwr(["run", app, superlink, "--run-config", run_config_arg(config, overrides)])
    return int(out["run-id"])


def wait(superlink: str, run_id: int, timeout: float, poll: float) -> dict:
    """Poll the run's status until it is finished; its last status dict. Raises LaunchError."""
    deadline = time.monotonic() + timeout
    failures = 0
    while True:
        try:
            runs = _flwr(["ls", superlink, "--run-id", str(run_id)], timeout=min(CLI_TIMEOUT_S, timeout))["runs"]
            failures = 0
        except LaunchError as e:
            failures += 1
            if failures >= UNREACHABLE_LIMIT:
                raise LaunchError(f"SuperLink {superlink!r} unreachable while waiting for run {run_id}: {e}") from None
            runs = []
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return runs[0]
        if time.monotonic() > deadline:
            try:
                _flwr(["stop", str(run_id), superlink], timeout=30)
            except LaunchError:
                pass  # already reported below: the run did not finish in time
            raise LaunchError(f"run {run_id} did not finish within --timeout={timeout:.0f}s; it was stopped")
        time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedpers.flower.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("superlink", help="SuperLink connection name in $FLWR_HOME/config.toml")
    ap.add_argument("--app", default=".", help="the fedpers app directory (default: .)")
    ap.add_argument("--config", help="YAML config (path on the SuperLink machine, or relative to the app)")
    ap.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds to wait for the run to end")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between status checks")
    ap.add_argument("--no-check", action="store_true", help="submit without validating the config here")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_intermixed_args(argv)
    if not args.no_check:
        from fedpers.config import ConfigError
        from fedpers.experiment import load_config

        try:
            local = Path(args.app) / args.config if args.config and not Path(args.config).is_file() else args.config
            load_config(local, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        run_id = submit(args.app, args.superlink, args.config, args.overrides)
        print(f"submitted run {run_id} to {args.superlink}", file=sys.stderr)
        status = wait(args.superlink, run_id, args.timeout, args.poll)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"run-id": run_id, "status": status["status"], "elapsed-s": status.get("elapsed")}))
    if status["status"] != "finished:completed":
        print(f"error: run {run_id} ended {status['status']} ({status.get('status-details', '')}); "
              f"see `flwr log {run_id} {args.superlink} --show`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
