"""``python -m fedpers.simulate [--config FILE] [key=value ...]``: config -> engine -> results folder."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from fedpers.config import ConfigError, ExperimentConfig, to_yaml
from fedpers.docs import describe_fields
from fedpers.experiment import load_config

USAGE = """Run a federated personalization simulation.

Overrides are dotted config fields, e.g.:
  python -m fedpers.simulate run.rounds=5 strategy.name=fedvpt data.partitioner.alpha=0.5
  python -m fedpers.simulate --config experiments/configs/default.yaml run.seed=1

Fields (name, type, default, meaning):
"""


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(
        prog="python -m fedpers.simulate",
        description=USAGE + describe_fields(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="YAML config file (see experiments/configs/)")
    ap.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("-v", "--verbose", action="store_true", help="also show Flower's and Ray's logs and warnings (debug level)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
    return ap.parse_args(argv)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedpers").setLevel(logging.INFO)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def preflight(cfg: ExperimentConfig) -> None:
    """Build the data and load the backbone once here, so bad data or weights fail before any round."""
    from pathlib import Path

    from fedpers.data.stats import describe_setting, write_report
    from fedpers.experiment import build

    exp = build(cfg)
    fed = exp.data()
    # Every results folder says what the clients' data looked like (same files as `python -m fedpers.partitions`).
    write_report(fed, Path(cfg.run.output_dir) / "partitions", describe_setting(cfg.data, cfg.run.seed))
    sizes = [c.num_train for c in fed.clients]
    logging.getLogger("fedpers").info(
        "%s: %d clients, train sizes min %d / max %d", cfg.data.dataset, len(sizes), min(sizes), max(sizes)
    )
    exp.client_setup()  # the frozen backbone, once per process; a bad one fails here


def run(cfg: ExperimentConfig, overwrite: bool = False, verbose: bool = False) -> dict:
    """Run ``cfg`` into its results folder. ``overwrite``: the caller owns the folder (the sweep re-runs
    unfinished cells) and allows replacing a run there, as ``run.overwrite=true`` does.

    Raises ConfigError (a folder holding a run or locked by another run, memory over
    ``run.max_memory_gb``) before any work, AlreadyFinished (``run.resume=true`` on a finished run; nothing
    is touched), and RunFailed after the last round when no round was applied or the final metrics are
    not finite. A failure before the first round leaves the results folder as it was (see
    :mod:`fedpers.results.run_folder`)."""
    from fedpers import safety
    from fedpers.models.weights_file import check_weights_file
    from fedpers.results import run_folder
    from fedpers.rounds import threads

    # Every check that can refuse runs before anything is created, moved or removed.
    run_folder.check(cfg, overwrite)
    if cfg.run.resume:  # a missing, foreign or unsafe checkpoint is refused before data and model load
        from fedpers.results.checkpoint import load_checkpoint

        run_folder.check_finished(cfg, load_checkpoint(cfg)["round"])
    safety.check_memory(cfg)
    check_weights_file(cfg.model)
    threads.prime()  # the fast engine's first thread decision samples the load during preflight
    with run_folder.claim(cfg, overwrite):  # locked; a failure before round 1 puts the folder back
        preflight(cfg)
        if cfg.run.engine in ("fast", "inprocess"):
            from fedpers.rounds.engine import InProcessTransport
            from fedpers.rounds.server import run_server

            transport = InProcessTransport(cfg)
            try:
                summary = run_server(cfg, transport)
            finally:
                transport.close()
        else:
            from fedpers.flower.simulation import run_flower_simulation

            summary = run_flower_simulation(cfg, verbose)
    safety.check_outcome(summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        print(to_yaml(cfg))
        return 0
    from fedpers.data import DataError
    from fedpers.models.prompted import BackboneError
    from fedpers.results.checkpoint import CheckpointError
    from fedpers.results.run_folder import AlreadyFinished
    from fedpers.safety import RunFailed

    t0 = time.perf_counter()
    try:
        summary = run(cfg, verbose=args.verbose)
    except AlreadyFinished as e:  # untouched; the result printed is the stored one
        print(f"note: {e}", file=sys.stderr)
        summary = e.summary
    except (ConfigError, DataError, BackboneError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # the results folder is written; it shows what went wrong
        print(f"error: the run failed: {e} (results in {cfg.run.output_dir})", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from fedpers.flower.apps import FlowerRunError

        if not isinstance(e, FlowerRunError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    final = summary["final"]
    print(json.dumps({
        "strategy": summary["strategy"],
        "accuracy_mean": round(final["accuracy_mean"], 4),
        "accuracy_std": round(final["accuracy_std"], 4),
        "accuracy_worst10": round(final["accuracy_worst10"], 4),
        "accuracy_weighted": round(final["accuracy_weighted"], 4),
        **({"perplexity_mean": round(final["perplexity_mean"], 3), "perplexity_worst10": round(final["perplexity_worst10"], 3)}
           if "perplexity_mean" in final else {}),
        "bytes_per_client_round": summary["bytes"],
        # The same number as summary.json's wall_time_s (the rounds, from the server's start); the command
        # also spends time building the data, loading the backbone and, on Flower, starting Ray.
        "wall_time_s": round(summary["wall_time_s"], 1),
        "command_time_s": round(time.perf_counter() - t0, 1),
        "results": cfg.run.output_dir,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
