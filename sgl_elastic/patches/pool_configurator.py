"""Patch of SGLang's ``model_executor/pool_configurator.py``: KV pool sizes under elastic widths.

- elastic layout: ranks with fewer KV heads have a smaller cell, so SGLang's per-rank arithmetic
  gives them more token slots than their peers; every rank must agree on the slot count (the
  scheduler on rank 0 admits requests for all of them, and the daemon holds one geometry), so
  the count is the minimum over the TP group (one all-reduce on its CPU group, at start-up);
- state daemon: a restarted scheduler takes the size of the KV pool the daemon already holds
  (free memory differs now; the daemon refuses another geometry); the largest held count over the
  group, so a rank whose daemon holds none yet (a rejoined node's) takes the others' size.
"""

from __future__ import annotations

from sgl_elastic.rank import daemon_link as link
from sgl_elastic.rank import state


def _agree(tokens: int, op: str = "MIN") -> int:
    import torch
    import torch.distributed as dist
    from sglang.srt.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    if group.world_size == 1:
        return tokens
    t = torch.tensor([tokens], dtype=torch.int64)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op), group=group.cpu_group)
    return int(t.item())


def calculate_pool_sizes(original, self, available_bytes, page_size):
    """DefaultPoolConfigurator.calculate_pool_sizes: see the module docstring."""
    held = link.held_kv_tokens(page_size) if link.active() else 0
    if state.layout() is not None:
        # every rank takes the same branch: across nodes a joined node's daemon holds no pool yet
        # while node 0's does (a rank alone in the MIN all-reduce below would wait forever)
        held = _agree(held, "MAX")
    if held:
        return self.calculate_pool_sizes_from_max_tokens(held, page_size)
    config = original(self, available_bytes, page_size)
    if state.layout() is None:
        return config
    agreed = _agree(config.max_total_num_tokens) // page_size * page_size
    if agreed == config.max_total_num_tokens:
        return config
    return self.calculate_pool_sizes_from_max_tokens(agreed, page_size)
