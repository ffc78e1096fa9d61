"""Baseline planners, for the benchmark and tests (same MigrationPlan type as CMM).

- ``plan_full_reload``: restart-and-reload: every new rank reads its whole shard from the host.
- ``plan_greedy``: "keep what you hold, reload the rest": survivors keep their old order, the new
  split is the default equal one (extra units to the lowest ranks), a rank keeps the overlap of its
  new and old shard and reloads everything else from the host (no peer copies).
"""

from __future__ import annotations

from sgl_elastic.layout import ElasticLayout, FamilyLayout, capacity_widths, equal_widths, replicated_kv_heads
from sgl_elastic.planner.cmm import build_plan, new_slots
from sgl_elastic.planner.plan import ClusterChange, MigrationPlan
from sgl_elastic.planner.topology import Topology

__all__ = ["plan_full_reload", "plan_greedy", "default_layout"]


def default_layout(old: ElasticLayout, n: int, policy: str = "equal", capacities: tuple[float, ...] = ()) -> ElasticLayout:
    """The layout a fresh start on ``n`` ranks would use (equal: extra units to the lowest ranks)."""
    fams: dict[str, FamilyLayout] = {}
    for name, fam in old.families.items():
        if name == "attn" and fam.num_kv_heads < n:
            fams[name] = fam.with_widths((1,) * n, replicated_kv_heads(fam.num_kv_heads, n))
        elif policy == "capacity":
            fams[name] = fam.with_widths(capacity_widths(fam.num_units, capacities))
        else:
            fams[name] = fam.with_widths(equal_widths(fam.num_units, n))
    return ElasticLayout(tp_size=n, families=fams, model=old.model, expert_parallel=old.expert_parallel, policy=policy)


def _setup(old: ElasticLayout, change: ClusterChange, topology: Topology | None):
    change = change.normalized()
    survivors, added = new_slots(old.tp_size, change)
    order = tuple(survivors + added)
    topo = topology or Topology.uniform(old.tp_size + len(added))
    policy = change.policy or old.policy
    caps = tuple(change.capacities[s] for s in order) if policy == "capacity" else ()
    return order, topo, default_layout(old, len(order), policy, caps)


def plan_greedy(old: ElasticLayout, change: ClusterChange, topology: Topology | None = None) -> MigrationPlan:
    order, topo, new = _setup(old, change, topology)
    return build_plan(old, change.normalized(), new, order, topo, allow_peer=False)


def plan_full_reload(old: ElasticLayout, change: ClusterChange, topology: Topology | None = None) -> MigrationPlan:
    order, topo, new = _setup(old, change, topology)
    return build_plan(old, change.normalized(), new, order, topo, allow_keep=False, allow_peer=False)
