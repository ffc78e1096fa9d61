"""Patches of ``sglang.srt.layers.moe.fused_moe_triton.layer``: FusedMoE with unequal widths.

MoE tensor parallelism (layout family "moe"): every rank holds every expert, each with this
rank's block of intermediate columns. The constructor hook passes SGLang an intermediate size of
``local * moe_tp_size`` (so its ``intermediate_size // moe_tp_size`` is this rank's width) and
marks the layer pre-sharded; the ``_load_w13`` / ``_load_w2`` hooks hand SGLang's own loaders
this rank's slice of each checkpoint tensor, so every layout-specific detail of those loaders
(gate/up order, padding on CPU) stays SGLang's.

Expert parallelism (layout family "experts", ``--ep-size == --tp``): rank r holds ``width``
whole experts of every MoE layer: the contiguous ``[start, end)`` of the layout (e.g. 3, 3, 2 of
8), or, once the planner placed them, the layer's own set (``FamilyLayout.rank_experts``). SGLang
asserts ``experts % ep == 0`` and places experts by ``rank * num_local``; the hook builds the layer
for this rank's experts only (``num_experts = width`` under a view with EP of one rank, so SGLang
allocates exactly ``width`` experts), then restores the global expert count and real EP rank, maps
global expert ids to local slots in ascending expert order (loader and dispatcher), and skips
SGLang's expert-location metadata (its placement assumes equal experts per rank; see
``expert_location``).

Placed experts (``FamilyLayout.held``; redundant ones with ``--elastic-redundant-experts``): a
rank's local slots hold its experts in the layout's slot order (so a rebalance rewrites only the
slots it changes), and with redundant slots an expert may be held by several ranks. Each routed
(token, expert) entry must be computed by exactly one of them (the all-reduce after the experts
sums the ranks' outputs), so before dispatch the layer maps the router's logical ids to physical
slots (rank by rank: rank 0's slots first) with ``kernels.remap_experts``: round robin over the
token index among the expert's copies, the same choice on every rank; the dispatcher's map then
takes physical ids (-1: another rank's slot).
"""

from __future__ import annotations

import inspect
import logging
import os
import time

from sgl_elastic.controller import faults
from sgl_elastic.controller.wire import ENV_EXPERT_LOADS
from sgl_elastic.rank import state

logger = logging.getLogger(__name__)

_ATTR = "_sgl_elastic_moe_slice"  # (start, size) of this rank's intermediate columns
_EXPERTS_ATTR = "_sgl_elastic_experts"  # this rank's global expert id -> local slot
_REMAP_ATTR = "_sgl_elastic_remap"  # redundant experts: (log2phy, logcnt, alive) of this layer
_MAP_EPOCH_ATTR = "_sgl_elastic_map_epoch"  # recovery epoch of the layout this layer's expert map follows
_HOLD_DIR = faults.hold_dispatch_dir()  # tests only, read once
_LOADS_PATH = os.environ.get(ENV_EXPERT_LOADS) or None  # --elastic-eplb: EP rank 0 counts expert loads
_counter = None  # moe.loads.LoadCounter of this process (EP rank 0 only)


def fused_moe_init(original, self, *args, **kwargs):
    layout = state.layout()
    if layout is None:
        return original(self, *args, **kwargs)
    if layout.expert_parallel:
        # at tp 1 too: the one rank left holds its experts in the slot order the survivors kept (a
        # redundant layout's), not SGLang's ascending order, so its expert map must follow the layout
        return _expert_parallel_init(original, self, *args, **kwargs)
    if layout.tp_size == 1:
        return original(self, *args, **kwargs)
    from sglang.srt.runtime_context import get_parallel

    par = get_parallel()
    if par.moe_tp_size == 1:
        return original(self, *args, **kwargs)
    if par.moe_tp_size != layout.tp_size:
        raise ValueError(
            f"FusedMoE: moe_tp_size={par.moe_tp_size} but the elastic layout has {layout.tp_size} ranks; "
            "combine elastic widths with --ep-size 1 (MoE TP) or --ep-size == --tp (expert parallelism)"
        )
    b = inspect.signature(original).bind(self, *args, **kwargs)
    fam = layout.family("moe")
    inter = b.arguments["intermediate_size"]
    if inter != fam.dim_size:
        raise ValueError(f"FusedMoE {b.arguments.get('prefix', '')!r}: intermediate {inter} != layout moe dim {fam.dim_size}")
    if b.arguments.get("num_fused_shared_experts", 0):
        raise NotImplementedError("FusedMoE with fused shared experts is not supported with elastic widths")
    start, end = fam.rank_dim_range(par.moe_tp_rank)
    b.arguments["intermediate_size"] = (end - start) * par.moe_tp_size
    original(*b.args, **b.kwargs)
    setattr(self, _ATTR, (start, end - start))
    self.use_presharded_weights = True  # the hooks below hand SGLang this rank's slice
    if b.arguments.get("layer_id") == 0:
        logger.info("sgl-elastic: TP%d holds moe columns [%d, %d) of %d", par.moe_tp_rank, start, end, inter)


def load_w13(original, self, expert_data, shard_dim, shard_id, loaded_weight, is_bias=False):
    sl = getattr(self, _ATTR, None)
    if sl is not None:
        if shard_id not in ("w1", "w3"):
            raise NotImplementedError(f"FusedMoE: elastic loading of fused {shard_id!r} checkpoints is not supported")
        loaded_weight = loaded_weight.narrow(-1 if is_bias else shard_dim, sl[0], sl[1])
    return original(self, expert_data, shard_dim, shard_id, loaded_weight, is_bias)


def load_w2(original, self, expert_data, shard_dim, shard_id, loaded_weight, is_bias=False):
    sl = getattr(self, _ATTR, None)
    if sl is not None and not is_bias:  # the w2 bias is over hidden, replicated
        loaded_weight = loaded_weight.narrow(shard_dim, sl[0], sl[1])
    return original(self, expert_data, shard_dim, shard_id, loaded_weight, is_bias)


def _expert_parallel_init(original, self, *args, **kwargs):
    import torch
    from sglang.srt.layers.moe.token_dispatcher.standard import StandardDispatcher
    from sglang.srt.runtime_context import get_parallel

    from sgl_elastic.rank.shard import parallel_view

    layout = state.layout()
    par = get_parallel()
    if par.moe_ep_size != layout.tp_size or par.moe_tp_size != 1:
        raise ValueError(
            f"FusedMoE: elastic expert parallelism needs --ep-size == --tp ({layout.tp_size}); "
            f"got moe_ep_size={par.moe_ep_size}, moe_tp_size={par.moe_tp_size}"
        )
    b = inspect.signature(original).bind(self, *args, **kwargs)
    fam = layout.family("experts")
    num_experts = b.arguments["num_experts"]
    if num_experts != fam.dim_size or b.arguments.get("num_fused_shared_experts", 0):
        raise ValueError(
            f"FusedMoE {b.arguments.get('prefix', '')!r}: {num_experts} experts "
            f"(shared: {b.arguments.get('num_fused_shared_experts', 0)}) but the layout has {fam.dim_size} routed experts"
        )
    rank = par.moe_ep_rank
    layer_id = b.arguments.get("layer_id")
    if fam.held and not isinstance(layer_id, int):
        raise ValueError(f"FusedMoE {b.arguments.get('prefix', '')!r}: placed experts need the layer id, got {layer_id!r}")
    held = fam.rank_experts(rank, layer_id if fam.held else 0)
    # Step 1: build a layer of exactly this rank's experts, as if it were the only EP rank.
    b.arguments["num_experts"] = len(held)
    with parallel_view(original, moe_ep_size=1, moe_ep_rank=0):
        original(*b.args, **b.kwargs)
    # Step 2: global expert ids and the real EP rank back.
    self.num_experts = self._num_global_routed = num_experts
    self.moe_runner_config.num_experts = num_experts
    self.moe_ep_size, self.moe_ep_rank, self._expert_storage_rank = par.moe_ep_size, rank, rank
    self.uses_expert_location = False
    setattr(self, _EXPERTS_ATTR, {e: i for i, e in enumerate(held)})
    setattr(self, _MAP_EPOCH_ATTR, state.map_epoch())
    # Step 3: the dispatcher maps global ids to local ones (-1: another rank's expert).
    disp = self.dispatcher
    if not isinstance(disp, StandardDispatcher):
        raise NotImplementedError(f"elastic expert parallelism supports the standard dispatcher, got {type(disp).__name__}")
    disp.num_experts = num_experts
    disp.moe_ep_size, disp.moe_ep_rank = par.moe_ep_size, rank
    if fam.held:
        mapping = _redundant_maps(self, fam, layer_id, rank)
    else:
        mapping = torch.full((num_experts,), -1, dtype=torch.int32, device=self.w13_weight.device)
        mapping[list(held)] = torch.arange(len(held), dtype=torch.int32, device=mapping.device)
    disp.local_expert_mapping = mapping
    if layer_id == 0:
        logger.info("sgl-elastic: EP%d holds experts %s of %d%s", rank, _ranges(sorted(held)), num_experts,
                    " (layer 0; placed per layer)" if fam.held else "")


def _redundant_maps(layer, fam, layer_id: int, rank: int):
    """Set the layer's logical -> physical remap (``_REMAP_ATTR``); return the dispatcher's physical ->
    local map of ``rank`` (module docstring)."""
    import torch

    dev = layer.w13_weight.device
    offs = [sum(fam.widths[:r]) for r in range(fam.num_ranks + 1)]
    phys: list[list[int]] = [[] for _ in range(fam.num_units)]
    for r in range(fam.num_ranks):
        for i, e in enumerate(fam.rank_experts(r, layer_id)):
            phys[e].append(offs[r] + i)
    width = max(len(p) for p in phys)
    log2phy = torch.tensor([p + [-1] * (width - len(p)) for p in phys], dtype=torch.int64, device=dev)
    logcnt = torch.tensor([len(p) for p in phys], dtype=torch.int64, device=dev)
    alive = torch.ones(offs[-1], dtype=torch.bool, device=dev)
    setattr(layer, _REMAP_ATTR, (log2phy, logcnt, alive))
    mapping = torch.full((offs[-1],), -1, dtype=torch.int32, device=dev)
    mapping[offs[rank]:offs[rank + 1]] = torch.arange(offs[rank + 1] - offs[rank], dtype=torch.int32, device=dev)
    return mapping


def _ranges(held) -> str:
    """``(0, 1, 2, 5)`` -> ``"[0, 3) [5, 6)"``."""
    out, i = [], 0
    while i < len(held):
        j = i
        while j + 1 < len(held) and held[j + 1] == held[j] + 1:
            j += 1
        out.append(f"[{held[i]}, {held[j] + 1})")
        i = j + 1
    return " ".join(out) or "none"


def map_global_expert_id(original, self, expert_id):
    """FusedMoE._map_global_expert_id_to_local_expert_id: this rank's expert offset."""
    experts = getattr(self, _EXPERTS_ATTR, None)
    if experts is None:
        return original(self, expert_id)
    return experts.get(expert_id, -1)


class StaleExpertMap(RuntimeError):
    """A MoE layer was asked to dispatch under an expert map of another epoch than the one served."""


def forward_impl(original, self, hidden_states, topk_output, *args, **kwargs):
    """FusedMoE.forward_impl (routing done, dispatch next): the stale-routing guard of elastic EP.

    The expert map (which rank holds which expert, and in which local slot) changes only with the
    layout, at a recovery, and then every rank builds a new model at the same step (the rebuild),
    stamped with the new epoch; a step in flight when a rank fails is abandoned (its collective
    fails) and its requests are routed again under the new map when they resume. This check makes
    that invariant loud: a layer whose map is not the epoch this process serves raises instead of
    sending tokens to slots that no longer hold their experts.

    With ``--elastic-eplb``, EP rank 0 also counts the routed expert ids here (``moe.loads``).
    With redundant experts the logical ids are then mapped to physical slots (module docstring).
    """
    epoch = getattr(self, _MAP_EPOCH_ATTR, None)
    if epoch is not None:
        if _LOADS_PATH is not None and self.moe_ep_rank == 0:
            _count(self.layer_id, topk_output)
        if _HOLD_DIR is not None and self.layer_id == 0 and self.moe_ep_rank == 0:
            _hold(epoch)
        if epoch != state.map_epoch():
            raise StaleExpertMap(f"MoE layer {self.layer_id}: expert map of epoch {epoch}, this process serves"
                                 f" epoch {state.map_epoch()}")
        remap = getattr(self, _REMAP_ATTR, None)
        if remap is not None:
            from sgl_elastic.kernels.remap import remap_experts

            topk_output = topk_output._replace(topk_ids=remap_experts(topk_output.topk_ids, *remap))
    return original(self, hidden_states, topk_output, *args, **kwargs)


def _count(layer_id: int, topk_output) -> None:
    global _counter
    ids = getattr(topk_output, "topk_ids", None)
    if ids is None:
        return
    if _counter is None:
        from sgl_elastic.moe.loads import LoadCounter

        model = state.layout().model
        _counter = LoadCounter(_LOADS_PATH, model.num_layers, model.num_experts)
    _counter.add(layer_id, ids)


def _hold(epoch: int) -> None:
    """Tests only (``faults.ENV_TEST_HOLD_DISPATCH``): wait between routing and dispatch once armed."""
    arm = os.path.join(_HOLD_DIR, "arm")
    try:
        os.unlink(arm)
    except FileNotFoundError:
        return
    tmp = os.path.join(_HOLD_DIR, f"held.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(str(epoch))
    os.replace(tmp, os.path.join(_HOLD_DIR, "held"))  # whole: a test reads it as soon as it exists
    logger.warning("sgl-elastic: test hold of a layer-0 MoE dispatch (expert map epoch %d)", epoch)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(_HOLD_DIR, "release")) and time.monotonic() < deadline:
        time.sleep(0.01)
