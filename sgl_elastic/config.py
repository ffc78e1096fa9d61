"""sgl-elastic's own server options (the ``--elastic-*`` flags), read once at the edge."""

from __future__ import annotations

import argparse
import dataclasses

WIDTH_POLICIES = ("equal", "capacity")


def parse_widths(text: str) -> tuple[int, ...]:
    """``"3,3,2"`` -> ``(3, 3, 2)``; a clear ValueError for anything else."""
    parts = [p.strip() for p in text.split(",")]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"--elastic-tp-widths {text!r}: expected comma-separated integers, e.g. 3,3,2"
        ) from None
    if any(w <= 0 for w in widths):
        raise ValueError(
            f"--elastic-tp-widths {text!r}: every rank needs a width >= 1 unit "
            f"(rank {next(i for i, w in enumerate(widths) if w <= 0)} has {min(widths)})"
        )
    return widths


@dataclasses.dataclass(frozen=True, slots=True)
class ElasticArgs:
    """Validated ``--elastic-*`` options.

    tp_widths: KV-head groups per TP rank (None: the server chooses, per ``width_policy``).
    width_policy: "equal" (floor/ceil shares) or "capacity" (proportional to free memory).
    admin_token: token for the ``/elastic/*`` admin API (None: generated at start).
    daemon: whether the state daemon holds weights and KV (None: decided by the launcher, on at tp > 1).
    failover: in-place failover on the survivors when a rank dies (needs the daemon).
    eplb: expert parallelism: place the experts by their measured loads at every recovery.
    eplb_interval_s: expert parallelism: also rebalance every this many seconds (0: only at recoveries).
    redundant_experts: expert parallelism: expert slots beyond one per expert (hot experts get copies on
        several ranks; a failure loses no expert another rank also holds).
    kv_backup: with failover, every rank mirrors its KV into a backup pool held on the next rank's device,
        so a failover keeps the KV of requests in flight and of cached prefixes (no re-prefill).
    drain_timeout_s: on SIGTERM, how long the requests in flight may take to finish before the rest are
        aborted (each gets an explicit error) and the server exits.
    in_place: how a failover turns a survivor's weights into its new shard on CPU ("remap": the kept bytes
        stay in their pages; "move": moved inside its segment; "off": copied into a new one).
    join: a node >= 1 that joins a serving server (its ranks added by scale-ups).
    node_port / node_host / link_gbps: several nodes (``--nnodes``): node 0's control port (and the next),
        this node's address on the nodes' network, the network's GB/s (the planner's model; also a cap
        on the daemons' reads from other nodes; 0: modelled at 1.25, not capped).
    """

    tp_widths: tuple[int, ...] | None = None
    width_policy: str = "equal"
    admin_token: str | None = None
    daemon: bool | None = False
    failover: bool = True
    checkin_timeout_s: float = 10.0
    hung_timeout_s: float = 5.0
    standby: int | None = None
    eplb: bool = True
    eplb_interval_s: float = 0.0
    kv_backup: bool = True
    redundant_experts: int = 0
    drain_timeout_s: float = 30.0
    in_place: str = "remap"
    node_port: int | None = None
    node_host: str | None = None
    link_gbps: float = 0.0
    join: bool = False

    def __post_init__(self):
        if self.node_port is not None and not 1024 <= self.node_port <= 65533:
            raise ValueError(f"--elastic-node-port {self.node_port}: give a port in 1024..65533 (it and the next two are used)")
        if not self.link_gbps >= 0:
            raise ValueError(f"--elastic-link-gbps {self.link_gbps}: give GB/s >= 0 (0: not capped)")
        if self.redundant_experts < 0:
            raise ValueError(f"--elastic-redundant-experts {self.redundant_experts}: give a number of slots >= 0")
        if not self.eplb_interval_s >= 0:
            raise ValueError(f"--elastic-eplb-interval {self.eplb_interval_s}: give a number of seconds >= 0 (0: off)")
        if self.eplb_interval_s and not self.eplb:
            raise ValueError("--elastic-eplb-interval needs load-driven placement: drop --no-elastic-eplb")
        if not self.checkin_timeout_s > 0:
            raise ValueError(f"--elastic-checkin-timeout {self.checkin_timeout_s}: give a positive number of seconds")
        if self.standby is not None and not 0 <= self.standby <= 8:
            raise ValueError(f"--elastic-standby {self.standby}: give 0..8 standby processes")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"--elastic-drain-timeout {self.drain_timeout_s}: give a number of seconds >= 0")
        if not self.hung_timeout_s >= 0:
            raise ValueError(f"--elastic-hung-timeout {self.hung_timeout_s}: give a number of seconds >= 0 (0: off)")
        if self.width_policy not in WIDTH_POLICIES:
            raise ValueError(
                f"--elastic-width-policy {self.width_policy!r}: choose one of {', '.join(WIDTH_POLICIES)}"
            )

    def check_tp_size(self, tp_size: int) -> None:
        if self.tp_widths is not None and len(self.tp_widths) != tp_size:
            raise ValueError(
                f"--elastic-tp-widths gives {len(self.tp_widths)} widths "
                f"({','.join(map(str, self.tp_widths))}) but --tp-size is {tp_size}: "
                "give one width per TP rank"
            )

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("sgl-elastic", "elastic tensor parallelism and failover")
        group.add_argument(
            "--elastic-tp-widths", default=None,
            help="KV-head groups per TP rank, comma-separated (e.g. 3,3,2 for 8 KV heads on 3 "
                 "ranks); MLP/MoE/vocab widths follow the same proportions. Default: chosen by "
                 "--elastic-width-policy.",
        )
        group.add_argument(
            "--elastic-width-policy", default="equal", choices=WIDTH_POLICIES,
            help="how the server chooses widths when --elastic-tp-widths is not given",
        )
        group.add_argument(
            "--elastic-admin-token", default=None,
            help="token required by the /elastic/* admin API (default: generated at start)",
        )
        group.add_argument(
            "--elastic-daemon", action=argparse.BooleanOptionalAction, default=None,
            help="keep weights and KV in the sgl-elastic state daemon (default: on at --tp > 1 for the model"
                 " types the elastic layout covers, which is what in-place failover needs)",
        )
        group.add_argument(
            "--elastic-failover", action=argparse.BooleanOptionalAction, default=True,
            help="when a TP rank dies, keep serving on the survivors in place (needs the daemon; on by default"
                 " at --tp > 1; --no-elastic-failover restarts every scheduler from the daemon instead)",
        )
        group.add_argument(
            "--elastic-checkin-timeout", type=float, default=10.0, metavar="SECONDS",
            help="after a rank failure, a survivor that has not stopped and checked in with the controller"
                 " within this time (hung, or stuck in a collective) is fenced (SIGKILL) and the recovery goes"
                 " on without it (default 10)",
        )
        group.add_argument(
            "--elastic-hung-timeout", type=float, default=5.0, metavar="SECONDS",
            help="a rank whose process has been silent this long (its heartbeat thread stopped: the process is"
                 " stopped or frozen, not merely slow) is fenced (SIGKILL) and recovered from like a dead one"
                 " (default 5; 0: off)",
        )
        group.add_argument(
            "--elastic-standby", type=int, default=None, metavar="N",
            help="warm standby rank processes to keep (SGLang imported, waiting): POST /elastic/add_rank then"
                 " does not pay the import. Each costs one idle process (~0.7 GB RSS on CPU). Default: 1 when"
                 " the machine has >= 8 cores and >= 32 GiB available, else 0",
        )

        group.add_argument(
            "--elastic-eplb", action=argparse.BooleanOptionalAction, default=True,
            help="with expert parallelism (--ep-size == --tp): at every recovery, place each MoE layer's experts"
                 " by the loads rank 0 measured (capacity-weighted rebalancer), moving only what must move"
                 " (default on; --no-elastic-eplb keeps each survivor's experts and spreads the lost ones)",
        )
        group.add_argument(
            "--elastic-eplb-interval", type=float, default=0.0, metavar="SECONDS",
            help="with expert parallelism: also rebalance the experts every this many seconds while serving,"
                 " when that lowers the busiest rank's load by >= 5%% (requests pause for the move; default 0:"
                 " off). POST /elastic/rebalance asks for one now",
        )

        group.add_argument(
            "--elastic-redundant-experts", type=int, default=0, metavar="N",
            help="with expert parallelism (--ep-size == --tp): N expert slots beyond one per expert, split over"
                 " the ranks; the loads place copies of the hot experts there (each token goes to one copy), and"
                 " a failure reloads no expert a survivor also holds (default 0)",
        )
        group.add_argument(
            "--elastic-drain-timeout", type=float, default=30.0, metavar="SECONDS",
            help="on SIGTERM the server stops admitting requests (new ones get a 503), lets those in flight"
                 " finish for up to this many seconds, aborts the rest (each gets an explicit error), then exits"
                 " leaving no process or shared-memory file behind (default 30)",
        )
        group.add_argument(
            "--elastic-in-place", choices=("remap", "move", "off"), default="remap",
            help="how a failover turns a survivor's weights into its new shard (CPU): remap them (the bytes it"
                 " keeps stay in their pages; the default), move them inside its segment, or copy them into a new"
                 " one (the last two are there to measure against)",
        )
        group.add_argument(
            "--elastic-kv-backup", action=argparse.BooleanOptionalAction, default=True,
            help="with in-place failover: every rank also writes its KV into a backup pool held beside the next"
                 " rank's, so after a failure the survivors keep the KV of the requests in flight and of cached"
                 " prefixes instead of prefilling them again (default on; costs up to a second copy of the KV"
                 " pools, in pages as tokens are written)",
        )

        nodes = parser.add_argument_group("sgl-elastic across nodes", "with --nnodes N (SGLang's multi-node launch)")
        nodes.add_argument(
            "--elastic-node-port", type=int, default=None, metavar="PORT",
            help="node 0's failover control port on --dist-init-addr's host (the other nodes' ranks connect to"
                 " it, their agents to PORT+1 and PORT+2); the same on every node (default: the --dist-init-addr"
                 " port + 32)",
        )
        nodes.add_argument(
            "--elastic-node-host", default=None, metavar="ADDR",
            help="this node's address on the nodes' network, where its state daemon serves the other nodes"
                 " (default: node 0: --dist-init-addr's host; others: --host when it names one address)",
        )
        nodes.add_argument(
            "--elastic-join", action="store_true",
            help="a node >= 1 that comes back to a server that serves without it: its ranks join the serving"
                 " ones (one scale-up each; the bytes come by copy from the other nodes or from this node's"
                 " checkpoint, whichever the planner models faster). Give the flags the node started with",
        )
        nodes.add_argument(
            "--elastic-link-gbps", type=float, default=0.0, metavar="GBPS",
            help="the network between nodes in GB/s: the planner copies from another node or reloads from this"
                 " node's checkpoint by the time each takes at this rate, and the daemons' reads from other"
                 " nodes are capped at it (default 0: modelled at 1.25 GB/s, not capped)",
        )

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ElasticArgs":
        widths = parse_widths(args.elastic_tp_widths) if args.elastic_tp_widths else None
        return cls(
            tp_widths=widths,
            width_policy=args.elastic_width_policy,
            admin_token=args.elastic_admin_token,
            daemon=args.elastic_daemon,
            failover=args.elastic_failover,
            checkin_timeout_s=args.elastic_checkin_timeout,
            hung_timeout_s=args.elastic_hung_timeout,
            standby=args.elastic_standby,
            eplb=args.elastic_eplb,
            eplb_interval_s=args.elastic_eplb_interval,
            kv_backup=args.elastic_kv_backup,
            redundant_experts=args.elastic_redundant_experts,
            drain_timeout_s=args.elastic_drain_timeout,
            in_place=args.elastic_in_place,
            node_port=args.elastic_node_port,
            node_host=args.elastic_node_host,
            link_gbps=args.elastic_link_gbps,
            join=args.elastic_join,
        )
