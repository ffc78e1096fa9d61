"""Applying a MigrationPlan to the daemon's weight segments, through the memory interface
(``DeviceMemory.run_plan``: each device runs it with its executor). The failed ranks' segments are dropped first: on this backend a device failure is the loss
of its daemon-held memory, so the plan may not read them (and does not: it reads survivors and
reloads the rest from the checkpoint).
"""

from __future__ import annotations

from sgl_elastic.memory import DeviceMemory, Segment
from sgl_elastic.executor.report import ExecReport
from sgl_elastic.executor.safetensors_io import SafetensorsCheckpoint
from sgl_elastic.planner.plan import MigrationPlan
from sgl_elastic.planner.topology import Topology

__all__ = ["check_plan", "run_plan"]

# Bandwidths only feed the executor's predicted time (reported, never used for decisions here):
# the figures the daemon measured after its load (``DeviceMemory.measure_bandwidths``), else these.
_CPU_READ_GBPS, _CPU_COPY_GBPS = 2.0, 5.0


def check_plan(plan: MigrationPlan, layout, held_ranks: set[int], remote_ranks: set[int] | None = None) -> None:
    """Raise ValueError saying what is wrong when ``plan`` cannot run on what the daemon holds
    (with ``remote_ranks``, a multi-node migration: the survivors are held here or by peer daemons)."""
    if plan.old_layout != layout:
        raise ValueError(
            "plan.old_layout is not the layout the daemon holds; plan from the daemon's current layout"
            " (the one given to LoadModel, or the new_layout of the last migration)"
        )
    survivors = set(range(plan.old_layout.tp_size)) - set(plan.change.failed)
    if remote_ranks is not None:
        both = sorted(held_ranks & remote_ranks)
        if both:
            raise ValueError(f"old ranks {both} are held here and given as remote too")
        held_ranks = held_ranks | remote_ranks
    missing = sorted(survivors - held_ranks)
    if missing:
        raise ValueError(
            f"surviving ranks {missing} are not held by this daemon (it holds {sorted(held_ranks)});"
            " a multi-node migration names the peer daemons' ranks (ApplyMigration.remote)"
        )


def run_plan(memory: DeviceMemory, plan: MigrationPlan, old: dict[int, Segment], ckpt: SafetensorsCheckpoint,
             label: str, bandwidths: tuple[float, float, float] | None = None,
             **nodes) -> tuple[dict[int, Segment], ExecReport]:
    """Execute ``plan``; ``old`` maps surviving old rank -> its weight segment. Returns new rank ->
    segment (the caller frees ``old``) and the executor's report. ``bandwidths``: measured (reload,
    copy, new memory) GB/s for the report's modelled time."""
    num_slots = plan.old_layout.tp_size + plan.change.added
    read_gbps, copy_gbps, alloc_gbps = bandwidths or (_CPU_READ_GBPS, _CPU_COPY_GBPS, 0.0)
    topo = Topology.single_node(num_slots, read_gbps=read_gbps, copy_gbps=copy_gbps, alloc_gbps=alloc_gbps)
    return memory.run_plan(plan, old, ckpt, topo, label=label, **nodes)
