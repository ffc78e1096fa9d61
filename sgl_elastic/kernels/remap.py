"""Logical -> physical expert remap with dead-slot masking: a Triton kernel and its torch reference.

Given the router's ``topk_ids`` (logical experts) and one MoE layer's maps, each entry becomes
the physical slot of one *live* replica of its expert:

* live replicas of expert e: ``log2phy[e, j]`` for ``j < logcnt[e]`` with ``0 <= log2phy[e, j] <
  num_physical`` and ``alive[log2phy[e, j]]``, in ``log2phy`` order;
* choice: the ``(t + e) % num_live``-th live replica, t the token (row) index: round robin over
  tokens, offset per expert so that experts with the same replicas do not pile onto one slot;
* ``topk_ids == -1`` (padding) stays -1;
* an expert with no live replica, or an id outside ``[-1, num_logical)``, is an error:
  ``remap_experts_reference(strict=True)`` raises ValueError naming the experts; the kernel (and
  ``strict=False``) writes -1 there, so a caller can check ``(out < 0) & (topk_ids >= 0)``.

``remap_experts`` is the entry point: the kernel on CUDA tensors, the reference (``strict=False``)
elsewhere. ``remap_experts_triton`` runs the kernel; on CPU tensors only in Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), for tests.
"""

from __future__ import annotations

import torch

__all__ = ["remap_experts", "remap_experts_reference", "remap_experts_triton"]


def remap_experts(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                  alive: torch.Tensor) -> torch.Tensor:
    """``[num_tokens, k]`` physical slots for ``topk_ids`` (same dtype), -1 where there is none.

    Shapes: ``topk_ids [num_tokens, k]``, ``log2phy [num_logical, max_replicas]`` (-1 padded),
    ``logcnt [num_logical]``, ``alive [num_physical]`` bool. No host synchronisation on CUDA.
    """
    if topk_ids.is_cuda:
        return remap_experts_triton(topk_ids, log2phy, logcnt, alive)
    return remap_experts_reference(topk_ids, log2phy, logcnt, alive, strict=False)


def remap_experts_reference(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                            alive: torch.Tensor, *, strict: bool = True) -> torch.Tensor:
    """Torch reference of the remap (any device); ``strict`` raises on an expert without a live replica."""
    _check(topk_ids, log2phy, logcnt, alive)
    num_logical, max_replicas = log2phy.shape
    num_physical = alive.shape[0]
    ids = topk_ids.long()
    pad = ids == -1
    bad = (ids < -1) | (ids >= num_logical)
    e = torch.where(pad | bad, 0, ids)
    reps = log2phy.long()[e]  # [num_tokens, k, max_replicas]
    j = torch.arange(max_replicas, device=ids.device)
    ok = (j < logcnt.long()[e].unsqueeze(-1)) & (reps >= 0) & (reps < num_physical)
    live = ok & alive.bool()[reps.clamp(0, num_physical - 1)]
    num_live = live.sum(-1)
    none = ~pad & ~bad & (num_live == 0)
    if strict and bool(bad.any()):
        raise ValueError(f"topk_ids hold ids outside [-1, {num_logical}): {ids[bad].unique()[:8].tolist()}")
    if strict and bool(none.any()):
        raise ValueError(
            f"logical experts {e[none].unique()[:8].tolist()} have no live replica (every slot of theirs is"
            f" dead): rebalance the experts onto the live ranks before routing"
        )
    token = torch.arange(ids.shape[0], device=ids.device).unsqueeze(-1)
    sel = (token + e) % num_live.clamp(min=1)
    pick = live & (live.cumsum(-1) - 1 == sel.unsqueeze(-1))
    out = (reps * pick).sum(-1)
    return torch.where(pad | bad | (num_live == 0), -1, out).to(topk_ids.dtype)


def remap_experts_triton(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                         alive: torch.Tensor, *, block: int = 256) -> torch.Tensor:
    """The Triton kernel: one program per ``block`` entries of ``topk_ids``; -1 where there is none."""
    _check(topk_ids, log2phy, logcnt, alive)
    _runs_here(topk_ids.device)
    topk = topk_ids.contiguous()
    l2p = log2phy.contiguous()
    out = torch.empty_like(topk)
    numel = topk.numel()
    if numel == 0:
        return out
    alive_u8 = alive.contiguous().view(torch.uint8) if alive.dtype == torch.bool else alive.to(torch.uint8)
    grid = (-(-numel // block),)
    _remap_kernel[grid](
        topk, out, l2p, logcnt.contiguous(), alive_u8,
        numel, topk.shape[1], l2p.shape[0], alive.shape[0], l2p.shape[1], BLOCK=block,
    )
    return out


def _check(topk_ids, log2phy, logcnt, alive) -> None:
    if topk_ids.dim() != 2 or log2phy.dim() != 2 or logcnt.dim() != 1 or alive.dim() != 1:
        raise ValueError(
            f"want topk_ids [num_tokens, k], log2phy [num_logical, max_replicas], logcnt [num_logical], alive"
            f" [num_physical]; got {tuple(topk_ids.shape)=} {tuple(log2phy.shape)=} {tuple(logcnt.shape)=}"
            f" {tuple(alive.shape)=}"
        )
    if logcnt.shape[0] != log2phy.shape[0]:
        raise ValueError(f"logcnt has {logcnt.shape[0]} experts but log2phy has {log2phy.shape[0]}")
    for name, t in (("topk_ids", topk_ids), ("log2phy", log2phy), ("logcnt", logcnt)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    devices = {t.device for t in (topk_ids, log2phy, logcnt, alive)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _runs_here(device: torch.device) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: use remap_experts_reference")
    if device.type != "cuda" and not isinstance(_remap_kernel, InterpretedFunction):
        raise ValueError(
            f"the Triton kernel got {device} tensors: on CPU it runs only in Triton's interpreter; set"
            f" TRITON_INTERPRET=1 before triton is first imported, or use remap_experts_reference"
        )


try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # the reference still works
    triton = None
else:

    @triton.jit
    def _remap_kernel(topk_ptr, out_ptr, log2phy_ptr, logcnt_ptr, alive_ptr, numel, k, num_logical,
                     num_physical, max_replicas, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < numel
        e = tl.load(topk_ptr + offs, mask=in_range, other=-1).to(tl.int64)
        known = in_range & (e >= 0) & (e < num_logical)
        e = tl.where(known, e, 0)
        cnt = tl.load(logcnt_ptr + e, mask=known, other=0)
        # Pass 1: live replicas of each entry's expert.
        num_live = tl.zeros([BLOCK], dtype=tl.int64)
        for j in range(0, max_replicas):
            ok = known & (j < cnt)
            p = tl.load(log2phy_ptr + e * max_replicas + j, mask=ok, other=-1).to(tl.int64)
            ok = ok & (p >= 0) & (p < num_physical)
            a = tl.load(alive_ptr + tl.where(ok, p, 0), mask=ok, other=0)
            num_live += (ok & (a != 0)).to(tl.int64)
        # Pass 2: the (token + e) % num_live-th live one.
        sel = (offs // k + e) % tl.maximum(num_live, 1)
        result = tl.full([BLOCK], -1, dtype=tl.int64)
        seen = tl.zeros([BLOCK], dtype=tl.int64)
        for j in range(0, max_replicas):
            ok = known & (j < cnt)
            p = tl.load(log2phy_ptr + e * max_replicas + j, mask=ok, other=-1).to(tl.int64)
            ok = ok & (p >= 0) & (p < num_physical)
            a = tl.load(alive_ptr + tl.where(ok, p, 0), mask=ok, other=0)
            live = ok & (a != 0)
            result = tl.where(live & (seen == sel), p, result)
            seen += live.to(tl.int64)
        result = tl.where(known & (num_live > 0), result, -1)
        tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=in_range)
