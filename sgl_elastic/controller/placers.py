"""Expert placement algorithms a rebalance may apply instead of ours, for side-by-side comparisons on
a live server: ``POST /elastic/rebalance`` with ``{"algorithm": NAME}``.

* ``ours``: ``moe.rebalance_experts`` (capacity-weighted), movement-aware (the default);
* ``deepseek``: SGLang's copy of DeepSeek's EPLB (global policy: one group, one node, a GPU per rank);
* ``elasticity_aware``: SGLang's, every rank of the (already shrunk) layout active.

The baselines assume equal GPUs: they need equal expert slots per rank (with redundant experts,
experts + redundant divisible by the ranks) and ignore capacity. Each is a ``placer`` for
``planner.experts.choose_placement``: ``placer(weight, slots, capacity) -> phy2log``.
"""

from __future__ import annotations

ALGORITHMS = ("ours", "deepseek", "elasticity_aware")


def _deepseek(weight, slots, capacity):
    from sglang.srt.eplb.eplb_algorithms import deepseek

    return deepseek.rebalance_experts(weight, sum(slots), 1, 1, len(slots), False)[0]


def _elasticity_aware(weight, slots, capacity):
    import torch
    from sglang.srt.eplb.eplb_algorithms import elasticity_aware

    active = torch.ones(len(slots), dtype=torch.bool)
    return elasticity_aware.rebalance_experts(weight, sum(slots), 1, 1, len(slots), False, active)[0]


def placer(name: str):
    """The ``placer`` of ``name`` (None for ours); ValueError naming the choices otherwise."""
    if name == "ours":
        return None
    if name == "deepseek":
        return _deepseek
    if name == "elasticity_aware":
        return _elasticity_aware
    raise ValueError(f"unknown placement algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")


def fits(name: str, layout) -> str | None:
    """Why ``name`` cannot place ``layout``'s experts (None: it can)."""
    if name == "ours" or "experts" not in layout.families:
        return None
    fam = layout.family("experts")
    if fam.redundant:  # the rebalance splits the slots equally for it (planner.experts.choose_placement)
        if (fam.num_units + fam.redundant) % fam.num_ranks:
            return (f"{name} needs equal expert slots per rank: {fam.num_units} experts + {fam.redundant} redundant"
                    f" slots do not divide by {fam.num_ranks} ranks")
    elif len(set(fam.widths)) != 1:
        return f"{name} needs equal expert slots per rank, the layout has {fam.widths} ({fam.num_units} experts)"
    return None
