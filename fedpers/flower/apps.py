"""Flower ServerApp and ClientApp: thin translators between Flower Messages and fedpers payloads.

The same two apps run under ``python -m fedpers.simulate`` (Flower's simulation engine) and under
``flwr run`` (deployment). The server sends the resolved config with every message, so clients need
no configuration of their own beyond their ``partition-id``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedpers.config import ConfigError, ExperimentConfig, RunConfig, to_yaml
from fedpers.experiment import from_layers, from_yaml
from fedpers.flower import node_state
from fedpers.payload import Failure, Reply
from fedpers.rounds.faults import ENV_VAR, HOSTILE, MALFORMED, InjectedFault, corrupt, env_fault

log = logging.getLogger("fedpers")

STATE_KEY = "fedpers.personal"
NODE_DISCOVERY_TIMEOUT_S = 120.0


class FlowerRunError(RuntimeError):
    pass


def _to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={k: Array.from_numpy_ndarray(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


class FlowerTransport:
    """Round-trip payloads through a Flower Grid, addressing clients by partition id."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, discovery_timeout_s: float = NODE_DISCOVERY_TIMEOUT_S):
        import uuid

        self.grid = grid
        self.cfg_yaml = to_yaml(cfg)
        # Names this run's personal states on the nodes (fedpers.flower.node_state).
        self.state_id = uuid.uuid4().hex  # replaced by the checkpoint's on resume (load_state_dict)
        self.pid_to_node = self._discover(cfg.run.num_clients, discovery_timeout_s)
        self.node_to_pid = {n: p for p, n in self.pid_to_node.items()}

    def _discover(self, num_clients: int, timeout_s: float) -> dict[int, int]:
        """Node ids are random per run: ask every node for its partition id."""
        deadline = time.monotonic() + timeout_s
        mapping: dict[int, int] = {}
        refused: set[int] = set()  # nodes whose data folder is unusable: asked once, then left out
        self.device_data_nodes = 0  # nodes training on their own folder (data-path), not a simulated partition
        while time.monotonic() < deadline:
            nodes = [n for n in self.grid.get_node_ids() if n not in mapping.values() and n not in refused]
            if nodes:
                msgs = [
                    Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=n, group_id="discover")
                    for n in nodes
                ]
                for reply in self.grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())):
                    if not reply.has_error() and "info" in reply.content:
                        pid = reply.content["info"].get("partition-id")
                        if "data-error" in reply.content["info"]:
                            log.error("partition %s: the node's data folder is unusable, node ignored: %s", pid,
                                      reply.content["info"]["data-error"])
                            refused.add(reply.metadata.src_node_id)
                            continue
                        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < num_clients:
                            log.warning("node %s claims partition-id %r, not one of 0..%d; ignored",
                                        reply.metadata.src_node_id, pid, num_clients - 1)
                            continue
                        if pid in mapping:
                            raise FlowerRunError(f"two nodes claim partition-id {pid}")
                        mapping[pid] = reply.metadata.src_node_id
                        self.device_data_nodes += int(bool(reply.content["info"].get("device-data", 0)))
            if len(mapping) + len(refused) >= num_clients:
                break
            time.sleep(0.5)
        missing = sorted(set(range(num_clients)) - set(mapping))
        if len(missing) == num_clients:
            raise FlowerRunError(f"no client node answered within {timeout_s:.0f}s")
        if missing:
            log.warning("partitions %s have no node; they will count as missing replies", missing)
        return mapping

    def exchange(self, server_round: int, payloads: dict[int, dict[str, np.ndarray]], timeout: float):
        out: dict[int, Reply | Failure] = {}
        msgs = []
        for pid, arrays in payloads.items():
            node = self.pid_to_node.get(pid)
            if node is None:
                out[pid] = Failure(pid, "missing", "no node serves this partition")
                continue
            content = RecordDict({
                "arrays": _to_record(arrays),
                "config": ConfigRecord({"server_round": server_round, "config_yaml": self.cfg_yaml,
                                        "state_id": self.state_id}),
            })
            msgs.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node,
                                group_id=str(server_round)))
        for reply in self.grid.send_and_receive(msgs, timeout=timeout):
            pid = self.node_to_pid.get(reply.metadata.src_node_id)
            if pid is None:
                continue
            if reply.has_error():
                out[pid] = Failure(pid, "error", reply.error.reason)
                continue
            try:
                out[pid] = _reply_of(reply)
            except Exception as e:  # noqa: BLE001 - whatever one client sent, it costs only its own reply, never the run
                out[pid] = Failure(pid, "invalid", f"malformed message: {type(e).__name__}: {e}")
        for pid in payloads:
            out.setdefault(pid, Failure(pid, "timeout", f"no reply within run.client_timeout_s={timeout}"))
        return out

    # Checkpoints keep the id under which nodes store this run's personal states, so a resumed run
    # finds them (the states themselves stay on the nodes).
    def state_dict(self) -> dict:
        return {"flower_state_id": self.state_id}

    def load_state_dict(self, state: dict) -> None:
        self.state_id = str(state["flower_state_id"])


def _reply_of(msg: Message) -> Reply:
    """A reply message as a :class:`Reply`. ``partition_id`` and ``num_examples`` keep the type the
    client sent (no ``int()``: that would truncate 5.9 to 5 and raise OverflowError on inf), so
    ``validate_reply`` rejects anything that is not an integer."""
    metrics = dict(msg.content["metrics"])
    pid, n = metrics.pop("partition_id"), metrics.pop("num_examples")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise TypeError(f"partition_id {pid!r} is not an integer")
    return Reply(partition_id=pid, arrays=_from_record(msg.content["arrays"]), num_examples=n,
                 metrics={k: float(v) for k, v in metrics.items()})


def config_from_run_config(run_config: dict) -> ExperimentConfig:
    """``flwr run --run-config``: ``config`` names a YAML file, ``overrides`` is a space-separated
    dotlist; any other key is taken as a dotted config field itself (simulation callers)."""
    import shlex

    from omegaconf import OmegaConf

    layers = []
    rc = dict(run_config)
    path = str(rc.pop("config", "") or "")
    if path:
        # Relative paths are looked up in the app first: under flwr run the cwd is the SuperLink's.
        app_root = Path(__file__).resolve().parents[2]
        layers.append(OmegaConf.load(app_root / path if (app_root / path).is_file() else path))
    dotlist = shlex.split(str(rc.pop("overrides", "") or ""))
    dotlist += [f"{k}={v}" for k, v in rc.items()]
    bad = [o for o in dotlist if "=" not in o]
    if bad:
        raise ConfigError("overrides", f"{bad[0]!r} is not key=value")
    if dotlist:
        layers.append(OmegaConf.from_dotlist(dotlist))
    return from_layers(layers)


def per_run_output_dir(c: ExperimentConfig, run_id: int) -> None:
    """`flwr run` without ``run.output_dir``: each run gets its own folder ``results/flwr-run-<run id>``,
    so a second ``flwr run .`` is not refused because the first one's results are there (a refusal that
    happens in the background, where only ``flwr log`` shows it). An explicit folder is kept."""
    if c.run.output_dir == RunConfig().output_dir:
        c.run.output_dir = str(Path(c.run.output_dir).parent / f"flwr-run-{run_id}")


def make_server_app(cfg: ExperimentConfig | None = None, result: dict | None = None) -> ServerApp:
    """A ServerApp running the fedpers round loop. With ``cfg=None`` the config comes from the run
    config (deployment). ``result`` receives the summary, or the exception that ended the run."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            from fedpers import safety
            from fedpers.rounds.server import run_server

            c = cfg if cfg is not None else config_from_run_config(context.run_config)
            if cfg is None:
                per_run_output_dir(c, context.run_id)
            if cfg is None:  # deployment: the checks and the folder claim simulate.run makes in a simulation
                from fedpers.models.weights_file import check_weights_file
                from fedpers.results import run_folder

                run_folder.check(c)
                if c.run.resume:  # a finished run stays as it is (AlreadyFinished says so)
                    from fedpers.results.checkpoint import load_checkpoint

                    run_folder.check_finished(c, load_checkpoint(c)["round"])
                safety.check_memory(c)
                check_weights_file(c.model)
                with run_folder.claim(c):
                    transport = FlowerTransport(grid, c)
                    if transport.device_data_nodes == 0:
                        write_partitions_report(c)  # `flwr run` of a simulated federation: the folder simulate writes
                    summary = run_server(c, transport)
                safety.check_outcome(summary)
            else:
                summary = run_server(c, FlowerTransport(grid, c))
        except BaseException as e:
            if result is not None:
                result["error"] = e
            raise
        if result is not None:
            result["summary"] = summary

    return app


def write_partitions_report(c: ExperimentConfig) -> None:
    """``<output_dir>/partitions/``, as ``python -m fedpers.simulate`` writes it, when every node trains
    on its partition of the simulated federation (no node has its own ``data-path``)."""
    from fedpers.data.stats import describe_setting, write_report
    from fedpers.experiment import build

    write_report(build(c).data(), Path(c.run.output_dir) / "partitions", describe_setting(c.data, c.run.seed))


server_app = make_server_app()
client_app = ClientApp()


@functools.lru_cache(maxsize=4)
def _parse_config(text: str) -> ExperimentConfig:
    return from_yaml(text)


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise KeyError("this SuperNode has no 'partition-id' in its --node-config")
    return int(context.node_config["partition-id"])


def _device_data(context: Context, cfg: ExperimentConfig, pid: int):
    """A real device trains on its own folder (``--node-config 'data-path=DIR'``, see
    fedpers.data.local); without one, on its partition of the simulated federation."""
    path = context.node_config.get("data-path")
    if not path:
        return None
    from fedpers.data.local import load_device_data

    return load_device_data(str(path), cfg.data, pid, cfg.run.seed)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    info = {"partition-id": _partition_id(context), "device-data": int(bool(context.node_config.get("data-path")))}
    problem = _data_problem(context)
    if problem:  # the server names it and does not count on this node, instead of failing every round
        info["data-error"] = problem
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


def _data_problem(context: Context) -> str:
    """Why this node's data folder (``data-path``) is unusable, or "" (checked once, at discovery)."""
    path = context.node_config.get("data-path")
    if not path:
        return ""
    from fedpers.data import DataError
    from fedpers.data.local import check_device_folder

    try:
        check_device_folder(str(path))
    except DataError as e:
        log.error("data-path: %s", e)
        return str(e)
    return ""


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from fedpers.dp import device_floor
    from fedpers.rounds.client_round import client_round  # here, not at import: node discovery needs no torch

    # The device's DP settings (node config) can only tighten what the server asked for.
    cfg = device_floor(_parse_config(str(msg.content["config"]["config_yaml"])), dict(context.node_config))
    server_round = int(msg.content["config"]["server_round"])
    pid = _partition_id(context)
    store = node_state.store_for(dict(context.node_config), dict(msg.content["config"]))
    if store is not None:  # on disk: survives a resumed run and a restarted SuperNode
        state = store.load(pid, server_round)
    else:
        state = _from_record(context.state[STATE_KEY]) if STATE_KEY in context.state else {}
    fault = env_fault(pid, server_round)  # fault drills only (FEDPERS_FAULTS); None otherwise
    if fault == "raise":
        raise InjectedFault(f"client {pid} raised in round {server_round} ({ENV_VAR})")
    if fault in ("hang", "silent"):  # a ClientApp must return eventually; sleeping past the timeout is silence
        time.sleep(float(os.environ.get("FEDPERS_FAULT_HANG_S", "600")))
    reply, new_state = client_round(cfg, pid, server_round, _from_record(msg.content["arrays"]), state,
                                    data=_device_data(context, cfg, pid))
    if fault in MALFORMED or fault in HOSTILE:
        reply = corrupt(reply, fault)
    context.state[STATE_KEY] = _to_record(new_state)
    if store is not None:
        store.save(pid, server_round, new_state, cfg.run.checkpoint_every)
    metrics = MetricRecord({**reply.metrics, "num_examples": reply.num_examples,
                            "partition_id": reply.partition_id})
    return Message(RecordDict({"arrays": _to_record(reply.arrays), "metrics": metrics}), reply_to=msg)
