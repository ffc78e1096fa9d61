"""MoE expert placement: the capacity-weighted rebalancer and the per-rank budget it runs on.

Pure (torch on CPU, numpy; no SGLang, no process groups). ``rebalance_experts`` is DeepSeek EPLB's
entry point generalised to unequal slot counts, unequal capacities and dead ranks.
"""

from sgl_elastic.moe.capacity import ExpertBudget, expert_budget
from sgl_elastic.moe.rebalance import rank_load_ratio, rebalance_experts

__all__ = ["rebalance_experts", "rank_load_ratio", "expert_budget", "ExpertBudget"]
