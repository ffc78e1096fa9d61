"""Drop-in for ``python -m sglang.launch_server`` with sgl-elastic's ``--elastic-*`` options.

Every ``sglang.launch_server`` flag is accepted unchanged. On a machine without CUDA, the CPU
settings that work (``cpu_defaults``) are filled in for every flag the user did not give.
Bad input (missing or non-existent model path, bad flags, bad widths) prints one ``error:`` line
and exits with status 2, before any process starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import warnings
from pathlib import Path

from sgl_elastic.config import ElasticArgs

PROG = "python -m sgl_elastic.launch_server"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# flag -> value, applied on a machine without CUDA when the user did not give the flag.
CPU_DEFAULTS: dict[str, object] = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    "--disable-cuda-graph": True,
    "--sleep-on-idle": True,
    # Ranks share the host's memory: the static fraction is a budget for weights + KV, and the KV
    # pool is sized by tokens (every rank the same), so the bench model fits at every tp.
    "--mem-fraction-static": 0.5,
    "--max-total-tokens": 8192,
}


def _given(argv: list[str], flag: str, parser: argparse.ArgumentParser) -> bool:
    """Whether ``flag`` (or one of its aliases) appears in ``argv`` (``--x v`` or ``--x=v``)."""
    action = next((a for a in parser._actions if flag in a.option_strings), None)
    names = action.option_strings if action else [flag]
    return any(arg == n or arg.startswith(n + "=") for arg in argv for n in names)


def cpu_defaults(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Extra argv entries for the CPU defaults the user did not override."""
    extra: list[str] = []
    for flag, value in CPU_DEFAULTS.items():
        if _given(argv, flag, parser):
            continue
        if value is True:
            extra.append(flag)
        else:
            extra += [flag, str(value)]
    return extra


def omp_threads_bind(tp_size: int, num_cpus: int | None = None) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``tp_size`` ranks: one core range per rank, ``|``-joined.

    Cores are split into ``tp_size`` contiguous ranges; with fewer cores than ranks, ranks share
    cores round-robin (``"0|1|0"`` for 3 ranks on 2 cores).
    """
    num_cpus = num_cpus or os.cpu_count() or 1
    if tp_size <= num_cpus:
        per = num_cpus // tp_size
        ranges = [(r * per, r * per + per - 1) for r in range(tp_size)]
        return "|".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)
    return "|".join(str(r % num_cpus) for r in range(tp_size))


def build_parser() -> argparse.ArgumentParser:
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0],
        # A short usage line: SGLang's full flag list (hundreds) would bury the error message.
        usage=f"{PROG} --model-path PATH [sglang.launch_server flags] [--elastic-* flags] (--help lists them)",
    )
    ServerArgs.add_cli_args(parser)
    ElasticArgs.add_cli_args(parser)
    return parser


def check_model_path(model_path: str) -> None:
    """A path that looks local must exist; a hub id (``org/name``) is left to SGLang."""
    path = Path(model_path).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ValueError(f"--model-path {model_path}: directory has no config.json")
        return
    looks_local = model_path.startswith((".", "/", "~")) or model_path.count("/") != 1
    if looks_local:
        raise ValueError(f"--model-path {model_path}: no such file or directory")


def prepare(argv: list[str]):
    """Parse and validate ``argv``; return ``(server_args, elastic_args)``. Starts no process."""
    from sglang.srt.server_args import prepare_server_args

    on_cpu = not cuda_available()
    parser = build_parser()
    args = parser.parse_args(argv)  # bad flags: argparse prints usage + error, exits 2
    elastic_args = ElasticArgs.from_cli_args(args)
    if elastic_args.daemon is None:
        elastic_args = dataclasses.replace(elastic_args, daemon=_default_daemon(args))
    check_model_path(args.model_path)
    elastic_args.check_tp_size(args.tp_size)

    # SGLang parses its own flags; ours are removed from its argv.
    sglang_argv = _strip_elastic_flags(argv, parser)
    if on_cpu:
        sglang_argv += cpu_defaults(sglang_argv, parser)
        if args.tp_size > 1:
            os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", omp_threads_bind(args.tp_size))
    if elastic_args.daemon:
        from sgl_elastic.patches.radix_backend import BACKEND, register

        if _given(sglang_argv, "--radix-cache-backend", parser) and BACKEND not in sglang_argv:
            raise ValueError(f"--elastic-daemon keeps the prefix cache in the daemon: drop --radix-cache-backend"
                             f" (it uses {BACKEND})")
        with warnings.catch_warnings():  # SGLang's cache modules warn that AWQ/GGUF need CUDA: not ours to say
            warnings.simplefilter("ignore")
            register()  # before SGLang parses --radix-cache-backend (it accepts registered names only)
        if not _given(sglang_argv, "--radix-cache-backend", parser):
            sglang_argv += ["--radix-cache-backend", BACKEND]
    server_args = prepare_server_args(sglang_argv)
    return server_args, elastic_args


def _strip_elastic_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    elastic_actions = [
        a for a in parser._actions if any(o.startswith(("--elastic-", "--no-elastic-")) for o in a.option_strings)
    ]
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        action = next(
            (a for a in elastic_actions for o in a.option_strings if arg == o or arg.startswith(o + "=")),
            None,
        )
        if action is None:
            out.append(arg)
        elif "=" not in arg and action.nargs != 0:
            skip = True  # the flag's value follows
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from sgl_elastic.version_check import check_sglang_version

        check_sglang_version()
        if not cuda_available():
            os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # before sglang is imported
            # SGLang's crash path waits 5 + 60 s for CUDA core dumps before it tears down: with no
            # CUDA that is a minute in which the clients of a dead server wait for nothing
            os.environ.setdefault("SGLANG_CUDA_COREDUMP_BEFORE_CRASH", "0")
        from sglang.srt.plugins import load_plugins

        load_plugins()
        server_args, elastic_args = prepare(argv)
        if getattr(server_args, "tp_size", 1) > 1 and getattr(server_args, "ep_size", 1) == server_args.tp_size:
            from sgl_elastic.controller.supervisor import ENV_EP

            os.environ[ENV_EP] = "1"  # every rank process keeps expert parallelism, at tp 1 too
        from sgl_elastic import patches

        activate = getattr(patches, "activate", None)
        if activate is not None:
            activate(elastic_args, server_args)
        elif elastic_args.tp_widths is not None:
            raise ValueError(
                "--elastic-tp-widths is not supported by this build yet (elastic TP patches absent)"
            )
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. SGLangVersionError
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    daemon, failover, admin_token, agent = None, None, None, None
    if elastic_args.join:
        return _join_node(server_args, elastic_args)
    if elastic_args.daemon:
        from sgl_elastic.controller.daemon import ServerDaemon
        from sgl_elastic.patches import daemon_layout, table

        nnodes = int(getattr(server_args, "nnodes", 1) or 1)
        node = int(getattr(server_args, "node_rank", 0) or 0)
        multi = nnodes > 1 and elastic_args.failover and int(server_args.tp_size) > 1
        try:
            node_host = _node_host(elastic_args, server_args, node) if multi else None
            daemon = ServerDaemon.start_for(daemon_layout(elastic_args, server_args), server_args, table.install,
                                            in_place=elastic_args.in_place, node_host=node_host,
                                            link_gbps=elastic_args.link_gbps, tcp=multi and node > 0)
            if multi and node > 0:
                agent = _start_agent(elastic_args, server_args, daemon, node, node_host)
            elif int(server_args.tp_size) > 1 and elastic_args.failover:
                failover, admin_token = _arm_failover(elastic_args, daemon, server_args if multi else None)
        except (ValueError, RuntimeError, TimeoutError) as exc:
            if daemon is not None:
                daemon.stop()
            print(f"{PROG}: error: --elastic-daemon: {exc}", file=sys.stderr)
            return 2

    from sglang.launch_server import run_server
    from sglang.srt.utils import kill_process_tree

    from sgl_elastic.controller.shm_ledger import ShmLedger

    from sglang.srt.entrypoints.http_server import app

    from sgl_elastic.controller.drain import Admission, DrainGuard

    ledger = ShmLedger(os.getpid()).start()
    app.add_middleware(Admission)
    DrainGuard(elastic_args.drain_timeout_s).start()
    try:
        run_server(server_args)
    finally:
        if failover is not None:
            failover.close()  # before the tear-down kills the ranks: that is not a failure
            admin_token.remove_file()
        if agent is not None:
            agent.close()
        if daemon is not None:
            daemon.stop()
        kill_process_tree(os.getpid(), include_parent=False)
        _wait_children(10.0)
        removed = ledger.sweep()
        if removed:
            print(f"[sgl-elastic] removed {len(removed)} /dev/shm file(s) SGLang's processes left:"
                  f" {removed[:4]}{' ...' if len(removed) > 4 else ''}", file=sys.stderr, flush=True)
    return 0


def _wait_children(timeout_s: float) -> None:
    """Wait (bounded) until every process this one started has exited."""
    import psutil

    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    _, alive = psutil.wait_procs(kids, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2.0)


def _spawn_rank(slot: int, standby: bool):
    """A new rank process (scale-up, or a warm standby), started like SGLang's schedulers (spawn)
    with the arguments the engine launched them with; it waits for the controller's orders."""
    import multiprocessing as mp

    from sgl_elastic.controller.supervisor import supervisor
    from sgl_elastic.rank import join

    launch = supervisor()._launch
    if launch is None:
        raise RuntimeError("the schedulers' launch was not recorded: cannot start a new rank")
    _, _, server_args, port_args, _, _ = launch
    proc = mp.get_context("spawn").Process(target=join.run_joiner, args=(server_args, port_args, slot, standby),
                                           name="sgle-standby" if standby else "sgle-joiner")
    proc.start()
    return proc


def _node_host(elastic_args, server_args, node: int) -> str:
    """This node's address on the nodes' network (``--elastic-node-host``)."""
    if elastic_args.node_host:
        return elastic_args.node_host
    if node == 0:
        return str(server_args.dist_init_addr).rpartition(":")[0].strip("[]") or "127.0.0.1"
    host = getattr(server_args, "host", None)
    if host and host not in ("0.0.0.0", "::"):
        return host
    raise ValueError(f"--node-rank {node} with --host {host}: give --elastic-node-host, this node's address on the"
                     " nodes' network (its state daemon serves node 0 there)")


def _start_agent(elastic_args, server_args, daemon, node: int, node_host: str):
    """A node >= 1: its ranks report to node 0's controller (``controller.nodes.NodeAgent``)."""
    from sgl_elastic.controller import nodes, wire
    from sgl_elastic.daemon.client import DaemonClient

    rank_ep, node_ep = nodes.control_endpoints(server_args, elastic_args.node_port)
    agent = nodes.NodeAgent(node, node_host, node_ep, elastic_args.hung_timeout_s)
    os.environ[wire.ENV_CONTROL] = rank_ep
    os.environ.update(agent.environ(elastic_args.hung_timeout_s / 5))
    os.environ[wire.ENV_KV_BACKUP] = "1" if elastic_args.kv_backup else ""
    c = DaemonClient.from_run_dir(daemon.proc.run_dir)
    agent.set_daemon(c.endpoint, c._token)
    nodes.set_agent(agent)
    print(f"[sgl-elastic] node {node} ({node_host}): its ranks {daemon.ranks} report to node 0's controller at"
          f" {node_ep}; its daemon serves on {c.endpoint}", file=sys.stderr, flush=True)
    return agent


def _join_node(server_args, elastic_args) -> int:
    """``--elastic-join`` on a node >= 1: start this node's daemon (empty), its agent and one new rank
    process per rank of its share; node 0's controller adds them to the serving ranks (scale-ups).
    Runs until they have all exited (a later failure of theirs is recovered like any other) or a signal."""
    import multiprocessing as mp
    import signal

    from sglang.srt.server_args import PortArgs

    from sgl_elastic.controller.daemon import ServerDaemon, node_ranks
    from sgl_elastic.rank import join

    node, nnodes = int(getattr(server_args, "node_rank", 0) or 0), int(getattr(server_args, "nnodes", 1) or 1)
    if nnodes < 2 or node < 1 or not elastic_args.failover or not elastic_args.daemon:
        print(f"{PROG}: error: --elastic-join is for a node >= 1 of a multi-node server with in-place failover"
              f" (--nnodes >= 2 --node-rank >= 1; got --nnodes {nnodes} --node-rank {node})", file=sys.stderr)
        return 2
    try:
        node_host = _node_host(elastic_args, server_args, node)
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    ranks = node_ranks(server_args)
    daemon = ServerDaemon(os.path.abspath(server_args.model_path), None, "shm", elastic_args.in_place, ranks=[],
                          node_host=node_host, link_gbps=elastic_args.link_gbps, tcp=True)
    procs: list = []
    agent = None
    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start(load=False)
        agent = _start_agent(elastic_args, server_args, daemon, node, node_host)
        # a joining rank is never rank 0 of its node's launch: the channels of rank 0 stay unused
        unused = "ipc:///nonexistent/sgl-elastic-joiner"
        port_args = PortArgs(tokenizer_ipc_name=unused, scheduler_input_ipc_name=unused, detokenizer_ipc_name=unused,
                             nccl_port=0, rpc_ipc_name=unused, metrics_ipc_name=unused,
                             tokenizer_worker_ipc_name=None, decoupled_spec_ipc_config=None)
        ctx = mp.get_context("spawn")
        for slot in range(len(ranks)):
            p = ctx.Process(target=join.run_joiner, args=(server_args, port_args, slot, False), name="sgle-joiner")
            p.start()
            procs.append(p)
        agent.watch(procs, [-1] * len(procs))
        print(f"[sgl-elastic] node {node} joins: {len(procs)} new rank process(es) {[p.pid for p in procs]}",
              file=sys.stderr, flush=True)
        while stop["sig"] is None and any(p.is_alive() for p in procs):
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
        if agent is not None:
            agent.close("its ranks ended" if stop["sig"] is None else f"signal {stop['sig']}")
        daemon.stop()
    return 0


def _arm_failover(elastic_args, daemon, multi_node_args=None):
    """In-place failover: the controller's socket (inherited by the schedulers) and the admin API;
    ``multi_node_args`` (node 0 of several): the other nodes' sockets too (``controller.nodes``)."""
    from sglang.srt.entrypoints.http_server import app

    from sgl_elastic.controller.admin import AdminToken, install_routes
    from sgl_elastic.controller.failover import controller
    from sgl_elastic.rank import state

    def on_new_layout(layout) -> None:  # processes spawned later (a fallback restart) get the new layout
        state.set_layout(layout)
        os.environ[state.ENV_VAR] = state.encode(layout)

    fc = controller()
    standby = elastic_args.standby
    if standby is None:
        import psutil

        standby = int((os.cpu_count() or 1) >= 8 and psutil.virtual_memory().available >= 32 << 30)
    nodes, kv_backup = None, elastic_args.kv_backup
    if multi_node_args is not None:
        from sgl_elastic.controller.nodes import control_endpoints

        nodes = (*control_endpoints(multi_node_args, elastic_args.node_port), int(multi_node_args.nnodes))
        fc.node_link_gbps = elastic_args.link_gbps
        standby = 0  # a new rank starts on node 0 only
    fc.arm(state.layout() or daemon.layout, daemon, on_new_layout=on_new_layout,
           omp_bind=lambda tp: "" if cuda_available() else omp_threads_bind(tp),
           checkin_timeout_s=elastic_args.checkin_timeout_s, hung_timeout_s=elastic_args.hung_timeout_s,
           spawn=_spawn_rank, standby=standby, eplb=elastic_args.eplb, eplb_interval_s=elastic_args.eplb_interval_s,
           kv_backup=kv_backup, nodes=nodes)
    token = AdminToken(elastic_args.admin_token)
    install_routes(app, token, fc)
    return fc, token


def _default_daemon(args) -> bool:
    """--elastic-daemon not given: on at tp > 1 when the elastic layout covers the model type."""
    if int(args.tp_size or 1) <= 1 or int(getattr(args, "pp_size", 1) or 1) != 1 or int(getattr(args, "dp_size", 1) or 1) != 1:
        return False
    if getattr(args, "quantization", None) or getattr(args, "load_format", "auto") not in ("auto", "safetensors"):
        return False
    try:
        import json

        with open(Path(args.model_path).expanduser() / "config.json") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError):
        return False
    from sgl_elastic.patches import SUPPORTED_MODEL_TYPES

    return model_type in SUPPORTED_MODEL_TYPES


if __name__ == "__main__":
    sys.exit(main())
