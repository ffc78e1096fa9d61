"""Shard pieces the patches share: where a rank's slice lives, loading it, variable-width gathers.

Not a patch itself (it patches nothing). Vocabulary as in ``sgl_elastic.layout``: sizes in
*elements* of the sharded tensor dimension.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """One contiguous slice of a checkpoint tensor that lands in this rank's parameter.

    param_offset: first element of the slice in this rank's parameter (sharded dim).
    src_start: first element of the slice in the checkpoint tensor of this sub-output
        (e.g. in ``k_proj.weight`` for the "k" piece of a QKV layer).
    size: elements of the slice.
    fused_offset: where this sub-output starts in a fused checkpoint tensor
        (``qkv_proj.weight`` / ``gate_up_proj.weight``); 0 for single-output layers.
    """

    param_offset: int
    src_start: int
    size: int
    fused_offset: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class LoadSpec:
    """How to fill the parameters of one elastic linear layer from the full checkpoint tensors.

    dim_attr: the parameter attribute naming the sharded dim ("output_dim" for column-parallel,
        "input_dim" for row-parallel layers). Parameters without it (a row-parallel bias) are
        replicated and loaded by SGLang's own loader.
    pieces: loaded shard id (None, 0, 1, "q", "k", "v") -> Piece.
    """

    dim_attr: str
    pieces: dict[Any, Piece]

    @property
    def size(self) -> int:
        return sum(p.size for p in self.pieces.values())


ATTR = "_sgl_elastic_load"  # the LoadSpec of an elastic layer (absent: a vanilla SGLang layer)

_UNSUPPORTED_PARAM_ATTRS = (
    "packed_dim", "is_gguf_weight", "is_gguf_weight_type", "use_bitsandbytes_4bit", "is_metadata",
    "needs_scalar_to_array",
)


def load_elastic(layer, spec: LoadSpec, param, loaded_weight: torch.Tensor, shard_id=None) -> bool:
    """Copy this rank's slice(s) of ``loaded_weight`` into ``param``; False if SGLang should load it.

    ``loaded_weight`` is the full (unsharded) checkpoint tensor of ``shard_id`` (or the fused
    tensor of every piece when ``shard_id`` is None and the layer has several pieces).
    """
    dim = getattr(param, spec.dim_attr, None)
    if dim is None:
        return False  # replicated parameter (e.g. a row-parallel bias)
    bad = [a for a in _UNSUPPORTED_PARAM_ATTRS if getattr(param, a, None) not in (None, False)]
    if bad:
        raise NotImplementedError(
            f"{type(layer).__name__} {getattr(layer, 'prefix', '')!r}: elastic widths support unquantized "
            f"weights only, this parameter has {bad}; run without --elastic-tp-widths or use an "
            "unquantized checkpoint"
        )
    if shard_id is None and len(spec.pieces) > 1:
        pieces = [(p, p.fused_offset) for p in spec.pieces.values()]
    else:
        if shard_id not in spec.pieces:
            raise NotImplementedError(
                f"{type(layer).__name__}: elastic loading of shard id {shard_id!r} is not supported "
                f"(known: {list(spec.pieces)})"
            )
        pieces = [(spec.pieces[shard_id], 0)]
    for piece, base in pieces:
        src = loaded_weight.narrow(dim, base + piece.src_start, piece.size)
        dst = param.data.narrow(dim, piece.param_offset, piece.size)
        if dst.shape != src.shape:
            raise ValueError(
                f"{type(layer).__name__} shard {shard_id!r}: {dst.shape=} != {src.shape=} "
                f"({piece=}, {loaded_weight.shape=}, {dim=})"
            )
        dst.copy_(src)
    return True


def all_gather_variable(x: torch.Tensor, widths: tuple[int, ...], group) -> torch.Tensor:
    """Concatenate, along the last dim, every rank's ``x`` of width ``widths[rank]``.

    ``x``: ``[..., widths[rank]]`` on each rank; returns ``[..., sum(widths)]`` in rank order.
    Pads to ``max(widths)`` so the equal-size collective of ``group`` (a GroupCoordinator) can
    carry it; with equal widths this is the plain all-gather.
    """
    max_w = max(widths)
    if x.shape[-1] != max_w:
        x = torch.nn.functional.pad(x, (0, max_w - x.shape[-1]))
    gathered = group.all_gather(x.contiguous(), dim=-1)
    if all(w == max_w for w in widths):
        return gathered
    return torch.cat([gathered[..., r * max_w : r * max_w + w] for r, w in enumerate(widths)], dim=-1)


class _ParallelView:
    """Reads like SGLang's ParallelContext, with a few values replaced."""

    def __init__(self, real, overrides: dict[str, int]):
        self._real = real
        self._overrides = overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._real, name)


@contextlib.contextmanager
def parallel_view(fn, **overrides: int):
    """While ``fn`` runs, its own module's ``get_parallel()`` returns the real context with ``overrides``.

    Scoped to one module's global and one constructor call (model construction is single-threaded);
    code in other modules (the linear layers, the dispatcher) keeps seeing the real context and
    process groups.
    """
    g = fn.__globals__
    real_get = g.get("get_parallel")
    if real_get is None:
        raise RuntimeError(f"{fn.__qualname__}: expected its module to call get_parallel(); SGLang changed")
    view = _ParallelView(real_get(), overrides)
    g["get_parallel"] = lambda: view
    try:
        yield
    finally:
        g["get_parallel"] = real_get
