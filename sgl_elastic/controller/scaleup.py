"""Scale-up (``POST /elastic/add_rank``) and warm standbys (``--elastic-standby``).

An accepted scale-up (202) is a command (``commands.AddRank``) the controller's thread carries out:
it starts a new rank process (or takes a warm standby, which paid the import already), waits for its
hello (a rank failure meanwhile is recovered first, then the scale-up goes on), and runs a recovery
that adds it. A scale-up the rank processes could not serve is refused before it is accepted (409).
"""

from __future__ import annotations

import os
import time

from sgl_elastic.controller import wire
from sgl_elastic.controller.commands import AddRank
from sgl_elastic.controller.phases import Outcome, Phase, log
from sgl_elastic.controller.procs import sigkill
from sgl_elastic.controller.recovery import Stragglers

JOIN_TIMEOUT_S = 180.0  # a new rank process must import SGLang and check in within this


class ScaleUp:
    """Mixed into ``FailoverController``."""

    def request_add_rank(self) -> tuple[str | None, int]:
        """``POST /elastic/add_rank``: (error, http status); None: accepted, the scale-up runs in the
        controller's thread (a recovery in /elastic/status)."""
        from sgl_elastic.planner.cmm import plan_migration
        from sgl_elastic.planner.plan import ClusterChange

        with self.lock:
            if not self.enabled or self._thread is None:
                return "in-place failover is off (--no-elastic-failover, or tp 1 at start): no scale-up", 409
            if self._spawn is None:
                return "scale-up needs the launcher's record of how ranks start (not available)", 409
            if self.phase is not Phase.SERVING or self.commands.has(AddRank):
                return f"a recovery or scale-up is in progress (phase {self.phase.value}); try again when serving", 409
            try:
                grown = plan_migration(self.layout, ClusterChange(added=1)).new_layout
            except ValueError as e:
                return f"cannot add a rank to the {len(self.ranks)} serving: {e}", 409
            attn = grown.family("attn")
            if attn.replicated:  # the planner can replicate KV heads; the rank processes cannot serve it
                return (f"cannot add a rank to the {len(self.ranks)} serving: {attn.num_kv_heads} KV heads on"
                        f" {grown.tp_size} ranks needs KV-head replication, which the elastic patches do not"
                        f" implement; this model serves on at most {attn.num_kv_heads} ranks"), 409
            self.commands.put(AddRank())
        return None, 202

    def _free_slot(self) -> int:
        with self.lock:
            used = {self._slot_of.get(p.pid, -1) for p in self.ranks if p.is_alive()}
        return next(i for i in range(len(used) + 1) if i not in used)

    def _keep_standby(self, live: list) -> None:
        """Keep ``standby_target`` warm standbys, spawned once every rank serves (its heartbeat is up)."""
        self.standby = [p for p in self.standby if p.is_alive()]
        if self._spawn is None or len(self.standby) >= self.standby_target:
            return
        if self.hung_timeout_s > 0 and not all(os.path.exists(wire.heartbeat_path(self._addr, p.pid)) for p in live):
            return
        p = self._spawn(-1, True)
        self.standby.append(p)
        log(f"warm standby started (pid {p.pid}): a scale-up will not pay the import")

    def _grow(self, joiner=None) -> None:
        """Start (or take the standby's) new rank process, wait for its hello, then recover with it.
        ``joiner``: a process started elsewhere (a rank of a node that came back, ``--elastic-join``)."""
        t0 = time.monotonic()
        self.standby = [p for p in self.standby if p.is_alive()]
        slot = self._free_slot()
        if joiner is None:
            joiner = self.standby.pop(0) if self.standby else self._spawn(slot, False)
        self._joiner_slot = slot
        self._joiners.append(joiner)
        log(f"scale-up: new rank process pid {joiner.pid} (slot {slot}); waiting for it to check in")
        got: dict[int, bytes] = {}
        try:
            while joiner.pid not in got:
                if joiner.pid in self._spare_hellos:
                    got[joiner.pid] = self._spare_hellos.pop(joiner.pid)
                    break
                if time.monotonic() - t0 > JOIN_TIMEOUT_S:
                    raise RuntimeError(f"the new rank (pid {joiner.pid}) did not check in within {JOIN_TIMEOUT_S:.0f} s")
                if not joiner.is_alive():
                    raise RuntimeError(f"the new rank process (pid {joiner.pid}) exited ({joiner.exitcode}) before joining")
                with self.lock:
                    dead = [p for p in self.ranks if p.pid not in self.departed and not p.is_alive()]
                if dead:  # the accepted scale-up waits for that recovery, then goes on
                    log("a rank died while the new one was starting: recovering from that first; the scale-up"
                         " goes on after it")
                    self._recover(dead)
                    continue
                try:
                    self._collect(got, {joiner.pid}, -1, 0.5, "hello")
                except Stragglers:
                    pass
        except Exception:
            self._joiners.remove(joiner)
            if joiner.is_alive():
                sigkill(joiner.pid)
            raise
        log(f"scale-up: the new rank checked in {time.monotonic() - t0:.2f} s after the request")
        self._recover([], got, joiner=joiner)
        rec = self.recoveries[-1]
        self.add_rank_last = {"decision": "done" if rec.result is Outcome.OK else "failed", "why": rec.outcome,
                              "tp_after": len(self.ranks)}
