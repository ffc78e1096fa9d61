"""The planner across nodes: link classes, unreachable pairs (a dead node, a partition), the per-byte
choice between a peer copy and a host reload by modelled time (checked against an exhaustive
enumeration), and the re-routing of copies whose link failed during a migration."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_elastic.layout import ElasticLayout
from sgl_elastic.layout.presets import preset_config
from sgl_elastic.planner import PEER, RELOAD, ClusterChange, Topology, plan_migration
from sgl_elastic.planner.exact import exact_min_makespan
from sgl_elastic.planner.cmm import reroute
from sgl_elastic.planner.sources import makespan
from test_planner import _attn, _blocks, _composition, check_plan_invariants, toy_shape

pytestmark = pytest.mark.unit


@st.composite
def node_cases(draw):
    """2-4 nodes x 1-2 ranks (2-8 ranks); one rank lost, a whole node lost, or a node (re)joining."""
    per_node = draw(st.lists(st.integers(1, 2), min_size=2, max_size=4))
    node_of_slot = [n for n, k in enumerate(per_node) for _ in range(k)]
    old_tp = len(node_of_slot)
    kind = draw(st.sampled_from(["rank", "node", "join"]))
    if kind == "rank":
        change = ClusterChange(failed=(draw(st.integers(0, old_tp - 1)),))
    elif kind == "node":
        dead = draw(st.integers(0, len(per_node) - 1))
        failed = tuple(s for s, n in enumerate(node_of_slot) if n == dead)
        if len(failed) == old_tp:
            failed = failed[:-1]
        change = ClusterChange(failed=failed)
    else:
        added = draw(st.integers(1, 2))
        if old_tp + added > 8:
            added = 1
        node_of_slot += [len(per_node)] * added  # the new node's devices
        change = ClusterChange(added=added)
    new_tp = old_tp - len(change.failed) + change.added
    tp_max = max(old_tp, new_tp)
    nkv = draw(st.integers(1, 4))
    qpk = max(1, -(-tp_max // nkv)) if nkv < tp_max else draw(st.integers(1, 2))
    inter = draw(st.integers(tp_max, 10))
    shape = toy_shape(nkv * qpk, nkv, inter, tp_max, hidden=draw(st.integers(1, 4)))
    attn = _attn(shape, old_tp) if nkv < old_tp else _attn(shape, old_tp, _composition(draw, nkv, old_tp))
    fams = {"attn": attn, "mlp": _blocks("mlp", inter, 1, _composition(draw, inter, old_tp))}
    layout = ElasticLayout(tp_size=old_tp, families=fams, model=shape)
    num_nodes = max(node_of_slot) + 1
    cut = ()
    if num_nodes >= 3 and draw(st.booleans()):
        cut = ((0, num_nodes - 1),)  # a partition between two nodes
    topo = Topology.nodes(node_of_slot, intra_gbps=draw(st.sampled_from([40.0, 100.0])),
                          inter_gbps=draw(st.sampled_from([0.0, 0.5, 4.0, 25.0])),
                          host_gbps=draw(st.lists(st.sampled_from([2.0, 5.0, 10.0]), min_size=num_nodes,
                                                  max_size=num_nodes)),
                          storage_gbps=draw(st.sampled_from([0.0, 8.0])), cut=cut)
    return layout, change, topo


def test_topology_of_nodes_names_link_classes_and_checks_its_input():
    topo = Topology.nodes([0, 0, 1, 1, 2], intra_gbps=100, inter_gbps=12.5, host_gbps=[10, 5, 5],
                          storage_gbps=20, cut=[(1, 2)])
    assert topo.num_nodes == 3 and topo.host_gbps == (10.0, 10.0, 5.0, 5.0, 5.0)
    assert [topo.link_class(0, d) for d in range(5)] == ["self", "node", "network", "network", "network"]
    assert topo.link_class(2, 4) == "none" and not topo.reachable(4, 3)  # nodes 1 and 2 are cut apart
    dead = topo.without_nodes([0])
    assert not dead.reachable(2, 0) and not dead.reachable(1, 0) and dead.reachable(2, 3)
    assert topo.without_links([(0, 2)]).link_class(2, 0) == "none"
    with pytest.raises(ValueError, match="one figure per node"):
        Topology.nodes([0, 1], intra_gbps=100, inter_gbps=10, host_gbps=[1, 2, 3])
    with pytest.raises(ValueError, match="positive bandwidth"):
        Topology.nodes([0, 1], intra_gbps=100, inter_gbps=10, host_gbps=0)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(node_cases())
def test_source_choice_is_the_fastest_split_and_never_crosses_a_missing_link(case):
    layout, change, topo = case
    timed = plan_migration(layout, change, topo)
    peer = plan_migration(layout, change, topo, source_choice="peer")
    check_plan_invariants(timed, topo, peer_rule=False)
    check_plan_invariants(peer, topo)
    assert timed.new_layout == peer.new_layout and timed.keep_bytes == peer.keep_bytes
    for op in timed.ops:
        if op.kind == PEER:
            assert topo.link_class(op.src_slot, timed.new2slot[op.dst_rank]) in ("node", "network")
    best = exact_min_makespan(peer.ops, peer.new2slot, topo)
    got = makespan(timed.ops, timed.new2slot, topo)
    assert got <= makespan(peer.ops, peer.new2slot, topo) * (1 + 1e-9)
    assert got == pytest.approx(best, rel=1e-9, abs=1e-15), (got, best)


def _mixtral_two_nodes(inter_gbps: float):
    old = ElasticLayout.from_hf_config(preset_config("Mixtral-8x22B"), 8)
    topo = Topology.nodes([0] * 4 + [1] * 4, intra_gbps=100.0, inter_gbps=inter_gbps, host_gbps=10.0,
                          storage_gbps=25.0)
    return old, topo


def _network_bytes(plan, topo) -> int:
    return sum(op.nbytes for op in plan.ops
               if op.kind == PEER and topo.link_class(op.src_slot, plan.new2slot[op.dst_rank]) == "network")


def test_a_slow_network_turns_cross_node_copies_into_local_reloads():
    """8 -> 7 on two nodes of 4. Over a 100 GB/s network the plan is the peer rule's (the reloads of the
    lost bytes are the bottleneck); over 1.25 GB/s (10 Gbit/s) most cross-node bytes are read from the
    destination node's own checkpoint instead, and the plan is modelled much faster than copying them."""
    for failed in ((5,), (0,)):
        old, fast = _mixtral_two_nodes(100.0)
        a = plan_migration(old, ClusterChange(failed=failed), fast)
        b = plan_migration(old, ClusterChange(failed=failed), fast, source_choice="peer")
        assert a.ops == b.ops and _network_bytes(a, fast) > 0

        old, slow = _mixtral_two_nodes(1.25)
        timed = plan_migration(old, ClusterChange(failed=failed), slow)
        copied = plan_migration(old, ClusterChange(failed=failed), slow, source_choice="peer")
        assert _network_bytes(copied, slow) > 0
        assert _network_bytes(timed, slow) < 0.25 * _network_bytes(copied, slow)
        assert timed.reload_bytes > timed.lower_bound_reload_bytes
        assert makespan(timed.ops, timed.new2slot, slow) < 0.5 * makespan(copied.ops, copied.new2slot, slow)


def test_a_dead_node_is_never_a_source_and_its_share_is_reloaded_on_the_survivors():
    old, topo = _mixtral_two_nodes(12.5)
    dead = topo.without_nodes([1])
    plan = plan_migration(old, ClusterChange(failed=(4, 5, 6, 7)), dead)
    check_plan_invariants(plan, dead, peer_rule=False)
    assert plan.new_layout.tp_size == 4
    assert all(op.src_slot < 4 for op in plan.ops if op.kind == PEER)
    assert plan.reload_bytes >= plan.lower_bound_reload_bytes > 0


def test_failed_links_are_rerouted_without_changing_the_layout():
    old, topo = _mixtral_two_nodes(25.0)
    plan = plan_migration(old, ClusterChange(failed=(5,)), topo)
    cross = [op for op in plan.ops if op.kind == PEER and topo.link_class(op.src_slot, plan.new2slot[op.dst_rank]) == "network"]
    assert cross
    src, dst = cross[0].src_slot, plan.new2slot[cross[0].dst_rank]
    failed = [op for op in plan.ops if op.kind == PEER and (op.src_slot, plan.new2slot[op.dst_rank]) == (src, dst)]
    broken = topo.without_links([(src, dst)])
    new_ops = reroute(plan, broken, failed)
    for f in failed:  # every failed granule is covered once, by a working link or a reload
        mine = sorted((op for op in new_ops if (op.family, op.subdim, op.dst_rank, op.layer)
                       == (f.family, f.subdim, f.dst_rank, f.layer) and f.start <= op.start < f.end),
                      key=lambda o: o.start)
        assert mine[0].start == f.start and mine[-1].end == f.end
        assert all(x.end == y.start for x, y in zip(mine, mine[1:]))
        assert sum(op.nbytes for op in mine) == f.nbytes
    assert all(op.kind == RELOAD or broken.reachable(op.src_slot, plan.new2slot[op.dst_rank]) for op in new_ops)
    kept = [op for op in plan.ops if op not in set(failed)]
    patched = msgspec.structs.replace(plan, ops=tuple(kept + new_ops))
    check_plan_invariants(patched, broken, peer_rule=False)
    with pytest.raises(ValueError, match="not a peer copy"):
        reroute(plan, broken, [op for op in plan.ops if op.kind == RELOAD][:1])


def _layout(tp: int) -> ElasticLayout:
    return ElasticLayout.from_hf_config(preset_config("Mixtral-8x22B"), tp)


def test_first_slots_keep_rank_0_on_node_0():
    """Several nodes: the request intake is node 0's, so new rank 0 is one of node 0's slots, for a
    failure, a scale-up onto another node, and both kinds of order search (exhaustive and CMM)."""
    for tp, change, node0 in [(4, ClusterChange(failed=(0,)), {1}), (4, ClusterChange(failed=(1,)), {0}),
                              (3, ClusterChange(added=1), {0, 1}), (8, ClusterChange(failed=(0, 2)), {1, 3}),
                              (6, ClusterChange(failed=(0,), added=1), {1, 2})]:
        layout = _layout(tp)
        plan = plan_migration(layout, change, first_slots=sorted(node0))
        assert plan.new2slot[0] in node0, (tp, change, plan.new2slot)
    with pytest.raises(ValueError, match="may be rank 0"):
        plan_migration(_layout(4), ClusterChange(failed=(0, 1)), first_slots=[0, 1])
