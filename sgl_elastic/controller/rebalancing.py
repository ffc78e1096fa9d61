"""Expert rebalancing (``--elastic-eplb``, ``--elastic-eplb-interval``, ``POST /elastic/rebalance``).

EP rank 0 counts the router's choices (``moe.loads``); a rebalance plans a placement by the loads
since the last placement and, when it lowers the imbalance enough, moves the experts in a recovery
with no failure (the ranks regroup). Periodic checks run in the detector's loop while serving; a
requested one is a command (``commands.Rebalance``).
"""

from __future__ import annotations

import time

from sgl_elastic.controller.commands import AddRank, Rebalance
from sgl_elastic.controller.phases import Outcome, Phase, log


class ExpertRebalance:
    """Mixed into ``FailoverController``."""

    def request_rebalance(self, algorithm: str = "ours") -> tuple[str | None, int]:
        """``POST /elastic/rebalance``: (error, http status); None: accepted, it runs in the controller's
        thread (a recovery in /elastic/status when experts move, else ``eplb.last`` says why not).
        ``algorithm``: ``controller.placers`` (another than ours is applied whenever it moves experts)."""
        from sgl_elastic.controller import placers

        if algorithm not in placers.ALGORITHMS:
            return f"unknown placement algorithm {algorithm!r}; choose one of {', '.join(placers.ALGORITHMS)}", 400
        with self.lock:
            if not self.enabled or self._thread is None:
                return "in-place failover is off (--no-elastic-failover, or tp 1 at start): no rebalance", 409
            if not self.eplb:
                return "expert rebalancing needs expert parallelism (--ep-size == --tp) and --elastic-eplb", 409
            if self.phase is not Phase.SERVING or self.commands.has(Rebalance) or self.commands.has(AddRank):
                return f"a recovery or scale-up is in progress (phase {self.phase.value}); try again when serving", 409
            why = placers.fits(algorithm, self.layout) if self.layout is not None else None
            if why:
                return why, 409
            self.commands.put(Rebalance(algorithm))
        return None, 202

    def _eplb_loads(self):
        """Rank 0's expert loads since the last placement, or None (off, or nothing routed yet)."""
        if not self.eplb or self._loads is None:
            return None
        loads = self._loads.loads()
        return loads if loads is not None and loads.sum() > 0 else None

    def _imbalance_now(self) -> float | None:
        """The served placement's imbalance under the loads since the last placement (None: no loads)."""
        loads = self._eplb_loads()
        if loads is None or self.layout is None:
            return None
        from sgl_elastic.planner.experts import default_capacity, expert_imbalance

        return round(expert_imbalance(self.layout, loads, default_capacity(self.layout)), 4)

    def _rebalance(self, forced: bool, algorithm: str = "ours") -> None:
        """Place the experts by the loads measured since the last placement, and move them (a recovery
        with no failure: the ranks regroup) when that lowers the imbalance by >= 5 % (``forced``: at all;
        another ``algorithm`` than ours: whenever it moves experts, to measure it)."""
        from sgl_elastic.controller.placers import placer
        from sgl_elastic.planner.cmm import plan_migration
        from sgl_elastic.planner.experts import default_capacity, expert_imbalance
        from sgl_elastic.planner.plan import ClusterChange

        t0 = time.monotonic()
        loads = self._eplb_loads()
        if loads is None:
            self.eplb_last = {"decision": "skipped", "why": "no expert loads measured since the last placement"}
            log(f"expert rebalance: {self.eplb_last['why']}")
            return
        first = None if self.hub is None else [i for i, p in enumerate(self.ranks) if self.is_local(p)]
        plan = plan_migration(self.layout, ClusterChange(), expert_loads=loads, rebalance_experts=True,
                              expert_placer=placer(algorithm), first_slots=first)
        cap = default_capacity(self.layout)
        before, after = expert_imbalance(self.layout, loads, cap), expert_imbalance(plan.new_layout, loads, cap)
        moved = plan.peer_bytes + plan.reload_bytes
        self.eplb_last = {"imbalance_before": round(before, 4), "imbalance_after": round(after, 4),
                          "tokens": float(loads.sum()), "moved_bytes": moved,
                          "plan_s": round(time.monotonic() - t0, 4), "algorithm": algorithm}
        if moved == 0 or (algorithm == "ours" and (after >= before or (not forced and after > 0.95 * before))):
            self.eplb_last |= {"decision": "skipped", "why": "the placement is already as good (within 5 %)"
                               if moved else "the experts are already placed so"}
            log(f"expert rebalance skipped: imbalance {before:.3f} -> {after:.3f}, {moved / 1e6:.1f} MB to move")
            return
        self.eplb_last["decision"] = "moving"
        self._recover([], plan=plan, reason=f"expert rebalance: imbalance {before:.3f} -> {after:.3f} over"
                                         f" {loads.sum():.0f} routed tokens, moving {moved / 1e6:.1f} MB")
        self.eplb_last["decision"] = "moved" if self.recoveries[-1].result is Outcome.OK else "failed"
