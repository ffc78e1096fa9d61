"""Patches of ``sglang.srt.layers.linear``: column / merged-column / QKV / row parallel layers.

SGLang sizes a layer's shard as ``total // tp_size`` and loads it from ``tp_rank * shard_size``.
For a layer built inside an elastic block (see ``state.building``; set by ``patches.models``),
the constructor hooks pass SGLang a total of ``local * tp_size`` so that SGLang's own arithmetic
allocates exactly this rank's width, then restore the true totals and attach a ``LoadSpec``
(where this rank's slice is in the checkpoint); the loader hooks copy that slice. Layers built
outside an elastic block, and every layer when no layout is active, are untouched.

Forward needs no change when inputs/outputs stay sharded (all-reduce paths); the two
equal-shard collectives (row input split, column output gather) become variable-width.
"""

from __future__ import annotations

import inspect

from sgl_elastic.rank import state
from sgl_elastic.rank.shard import ATTR, LoadSpec, Piece, all_gather_variable, load_elastic

_GATHER_ATTR = "_sgl_elastic_gather_widths"  # column layer: output widths of every rank
_SPLIT_ATTR = "_sgl_elastic_split_input"  # row layer: (start, size) of this rank's input slice


def _bind(fn, *args, **kwargs) -> inspect.BoundArguments:
    return inspect.signature(fn).bind(*args, **kwargs)


def _group_size(parallel_group) -> int:
    from sglang.srt.distributed.utils import get_group_rank_size
    from sglang.srt.layers.linear import _resolve_linear_group

    return get_group_rank_size(_resolve_linear_group(parallel_group))[1]


def _check_tp(tp: int, what: str) -> bool:
    """True when the layer is TP-sharded over the layout's ranks; False for an unsharded layer."""
    layout = state.layout()
    if tp == 1:
        return False
    if tp != layout.tp_size:
        raise ValueError(
            f"{what}: its TP group has {tp} ranks but the elastic layout has {layout.tp_size}; "
            "attention/dp-attention groups narrower than --tp are not supported with elastic widths"
        )
    return True


def _rank_widths(total: int, plan) -> tuple[int, ...]:
    """Every rank's width (elements) of a block dim of ``total`` elements, from the layout."""
    layout = state.layout()
    if isinstance(plan, state.AttnPlan):
        attn = layout.family("attn")
        per_head = total // plan.total_q_heads
        return tuple(attn.rank_q_heads(r) * per_head for r in range(layout.tp_size))
    fam = layout.family(plan.family)
    return tuple(fam.rank_dim_size(r) for r in range(layout.tp_size))


# ---- constructors ---------------------------------------------------------------------------------
def qkv_init(original, self, *args, **kwargs):
    """QKVParallelLinear.__init__: this rank's query/KV heads from the attention plan."""
    plan = state.current_plan()
    if not isinstance(plan, state.AttnPlan):
        return original(self, *args, **kwargs)
    b = _bind(original, self, *args, **kwargs)
    a = b.arguments
    tp = _group_size(a.get("parallel_group"))
    if a.get("kv_parallel_group") is not None and _group_size(a["kv_parallel_group"]) != tp:
        raise NotImplementedError("QKVParallelLinear with a separate KV group is not supported with elastic widths")
    if not _check_tp(tp, "QKVParallelLinear"):
        return original(self, *args, **kwargs)
    total_q, total_kv = a["total_num_heads"], a.get("total_num_kv_heads") or a["total_num_heads"]
    if (total_q, total_kv) != (plan.total_q_heads, plan.total_kv_heads):
        raise ValueError(
            f"QKVParallelLinear {a.get('prefix', '')!r}: built with {total_q} q / {total_kv} kv heads but the "
            f"elastic layout has {plan.total_q_heads} / {plan.total_kv_heads}"
        )
    # Step 1: let SGLang allocate exactly this rank's heads (its `total // tp` is our local count).
    a["total_num_heads"] = plan.num_q_heads * tp
    a["total_num_kv_heads"] = plan.num_kv_heads * tp
    original(*b.args, **b.kwargs)
    # Step 2: true totals back; where this rank's heads live in q_proj / k_proj / v_proj.
    self.total_num_heads, self.total_num_kv_heads = total_q, total_kv
    hd, vhd = self.head_size, self.v_head_size
    nq, nkv = plan.num_q_heads, plan.num_kv_heads
    q0, kv0 = plan.q_heads[0], plan.kv_heads[0]
    setattr(self, ATTR, LoadSpec("output_dim", {
        "q": Piece(0, q0 * hd, nq * hd, 0),
        "k": Piece(nq * hd, kv0 * hd, nkv * hd, total_q * hd),
        "v": Piece((nq + nkv) * hd, kv0 * vhd, nkv * vhd, (total_q + total_kv) * hd),
    }))


def merged_column_init(original, self, *args, **kwargs):
    """MergedColumnParallelLinear.__init__ (gate_up): this rank's intermediate columns of each output."""
    plan = state.current_plan()
    if not isinstance(plan, state.BlockPlan):
        return original(self, *args, **kwargs)
    b = _bind(original, self, *args, **kwargs)
    a = b.arguments
    if not _check_tp(_group_size(a.get("parallel_group")), "MergedColumnParallelLinear"):
        return original(self, *args, **kwargs)
    sizes = list(a["output_sizes"])
    if any(s != plan.total for s in sizes):
        raise ValueError(
            f"MergedColumnParallelLinear {a.get('prefix', '')!r}: output sizes {sizes} do not match the "
            f"elastic {plan.family} dim {plan.total}"
        )
    tp = state.layout().tp_size
    a["output_sizes"] = [plan.size * tp] * len(sizes)
    original(*b.args, **b.kwargs)
    self.output_sizes, self.output_size = sizes, sum(sizes)
    setattr(self, ATTR, LoadSpec("output_dim", {
        i: Piece(i * plan.size, plan.start, plan.size, i * plan.total) for i in range(len(sizes))
    }))


def column_init(original, self, *args, **kwargs):
    """ColumnParallelLinear.__init__ (plain column layers inside an elastic block)."""
    plan = state.current_plan()
    if not isinstance(plan, state.BlockPlan):
        return original(self, *args, **kwargs)
    b = _bind(original, self, *args, **kwargs)
    a = b.arguments
    if not _check_tp(_group_size(a.get("parallel_group")), "ColumnParallelLinear"):
        return original(self, *args, **kwargs)
    if a["output_size"] != plan.total:
        raise ValueError(f"ColumnParallelLinear {a.get('prefix', '')!r}: output {a['output_size']} != {plan.total}")
    gather = bool(a.get("gather_output", False))
    a["output_size"] = plan.size * state.layout().tp_size
    a["gather_output"] = False  # the equal-width gather is replaced by a variable-width one
    original(*b.args, **b.kwargs)
    self.output_size = plan.total
    setattr(self, ATTR, LoadSpec("output_dim", {None: Piece(0, plan.start, plan.size)}))
    if gather:
        setattr(self, _GATHER_ATTR, _rank_widths(plan.total, plan))


def row_init(original, self, *args, **kwargs):
    """RowParallelLinear.__init__ (o_proj / down_proj): this rank's input columns."""
    plan = state.current_plan()
    if plan is None:
        return original(self, *args, **kwargs)
    b = _bind(original, self, *args, **kwargs)
    a = b.arguments
    if not _check_tp(_group_size(a.get("parallel_group")), "RowParallelLinear"):
        return original(self, *args, **kwargs)
    total = a["input_size"]
    if isinstance(plan, state.AttnPlan):
        if total % plan.total_q_heads:
            raise ValueError(f"RowParallelLinear {a.get('prefix', '')!r}: input {total} is not heads x head_dim")
        per_head = total // plan.total_q_heads
        start, size = plan.q_heads[0] * per_head, plan.num_q_heads * per_head
    else:
        if total != plan.total:
            raise ValueError(f"RowParallelLinear {a.get('prefix', '')!r}: input {total} != {plan.family} dim {plan.total}")
        start, size = plan.start, plan.size
    split_input = not a.get("input_is_parallel", True)
    a["input_size"] = size * state.layout().tp_size
    a["input_is_parallel"] = True  # the equal-width split is replaced by ours (forward hook)
    original(*b.args, **b.kwargs)
    self.input_size = total
    setattr(self, ATTR, LoadSpec("input_dim", {None: Piece(0, start, size)}))
    if split_input:
        setattr(self, _SPLIT_ATTR, (start, size))


# ---- loaders --------------------------------------------------------------------------------------
def weight_loader(original, self, param, loaded_weight, *args, **kwargs):
    """Every linear ``weight_loader``: copy this rank's slice for elastic layers."""
    spec = getattr(self, ATTR, None)
    if spec is not None:
        shard_id = args[0] if args else kwargs.get("loaded_shard_id")
        if load_elastic(self, spec, param, loaded_weight, shard_id):
            return None
    return original(self, param, loaded_weight, *args, **kwargs)


def weight_loader_v2(original, self, param, loaded_weight, *args, **kwargs):
    """The v2 (quantized-parameter) loaders: refused loudly on elastic layers."""
    if getattr(self, ATTR, None) is not None:
        raise NotImplementedError(
            f"{type(self).__name__} {getattr(self, 'prefix', '')!r}: elastic widths support unquantized "
            "checkpoints only (this layer uses a quantized v2 parameter loader); run without "
            "--elastic-tp-widths or use an unquantized checkpoint"
        )
    return original(self, param, loaded_weight, *args, **kwargs)


# ---- forward --------------------------------------------------------------------------------------
def row_forward(self, input_, *args, **kwargs):
    """RowParallelLinear.forward (BEFORE): variable-width split of a replicated input."""
    split = getattr(self, _SPLIT_ATTR, None)
    if split is None:
        return None
    start, size = split
    return (self, input_[..., start : start + size].contiguous(), *args), kwargs


def column_forward(original, self, input_, *args, **kwargs):
    """ColumnParallelLinear.forward: variable-width output gather."""
    widths = getattr(self, _GATHER_ATTR, None)
    output, bias = original(self, input_, *args, **kwargs)
    if widths is not None:
        from sglang.srt.distributed import get_tp_group

        output = all_gather_variable(output, widths, get_tp_group())
    return output, bias
