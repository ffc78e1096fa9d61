"""Request accounting (main process): every request the tokenizer manager accepted ends exactly once,
finished or with an error the client sees, and one that no rank holds any more is found and ended.

Counted (``/elastic/status`` ``requests``, and the Prometheus metrics):
- ``accepted``: generation requests the tokenizer manager dispatched to rank 0;
- ``finished``: ended with their output (any finish reason but ``abort``);
- ``errored``: ended with an explicit error (an abort finish reason: a failover that could not
  resume it, a drain's timeout, a client that went away, SGLang's own aborts), by reason;
- ``in_flight``: accepted and not ended;
- ``lost``: found by the audit below (accepted, not ended, held by no rank); each is ended with a
  503 at once so its client sees an error, and logged. It must stay 0.

The audit, while the server serves, every ``AUDIT_S`` and only when some request is older than
``GRACE_S``: the controller asks rank 0 which requests it holds (a file in the controller's run
dir; rank 0 answers from its event loop, ``rank.signals.maybe_audit``), then compares with
the tokenizer manager's open requests that were open before it asked and still are. A request
missing from two answers in a row, with no output between them, is lost: an output on its way
(between the scheduler and the tokenizer) takes milliseconds, the two answers are seconds apart.
Rank 0 that does not answer within ``REPLY_S`` (a long forward, a recovery starting) skips a round.
"""

from __future__ import annotations

import json
import os
import threading
import time

from sgl_elastic.controller import reqtrace

__all__ = ["RequestAccounts", "AUDIT_S", "GRACE_S", "live_rids"]

AUDIT_S = 3.0  # how often the audit runs while serving
GRACE_S = 2.0  # a request younger than this is not audited (it may still sit in rank 0's socket)
REPLY_S = 2.0  # how long the audit waits for rank 0's answer
_HEALTH = "HEALTH_CHECK"  # SGLang's /health_generate probes: not user requests


class RequestAccounts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted = 0
        self.finished = 0
        self.errored: dict[str, int] = {}
        self.lost = 0
        self.lost_rids: list[str] = []  # the last few, for the log and the status
        self.open: dict[str, float] = {}  # rid -> last sign of progress (accepted, or its last output)
        self._suspects: dict[str, float] = {}  # rid -> its progress time when an audit first missed it
        self._seq = 0
        self._audit_t = 0.0

    # ---- the tokenizer manager's hooks (its event loop thread) -------------------------------------
    def accept(self, rid: str) -> None:
        if rid.startswith(_HEALTH):
            return
        with self.lock:
            if rid not in self.open:
                self.accepted += 1
            self.open[rid] = time.monotonic()
        reqtrace.note("accept", [rid])

    def outputs(self, recv_obj) -> None:
        """A batch output reached the tokenizer manager: note progress, count what ended."""
        rids = getattr(recv_obj, "rids", None) or []
        reasons = getattr(recv_obj, "finished_reasons", None) or [None] * len(rids)
        now = time.monotonic()
        if reqtrace.on():
            reqtrace.note("out", rids, fin=[bool(fr) for fr in reasons])
        with self.lock:
            for rid, fr in zip(rids, reasons):
                if rid not in self.open:
                    continue
                if not fr:
                    self.open[rid] = now
                    continue
                self._end(rid, fr)

    def _end(self, rid: str, fr) -> None:
        del self.open[rid]
        self._suspects.pop(rid, None)
        kind = fr.get("type") if isinstance(fr, dict) else str(fr)
        if kind == "abort":
            msg = str(fr.get("message") or "abort") if isinstance(fr, dict) else "abort"
            key = _reason_key(msg)
            self.errored[key] = self.errored.get(key, 0) + 1
        else:
            self.finished += 1

    def ended_with_error(self, rids, msg: str) -> None:
        """Requests ended with the error ``msg`` outside the batch path (refused at dispatch)."""
        with self.lock:
            for rid in rids:
                if rid in self.open:
                    self._end(rid, {"type": "abort", "message": msg})

    def ended_elsewhere(self, live_rids, why: str = "ended by the tokenizer manager (abort or error reply)") -> None:
        """Requests the tokenizer manager dropped with no output through its batch path (an abort it
        answered itself, an error reply): counted as errored."""
        with self.lock:
            for rid in [r for r in self.open if r not in live_rids]:
                self._end(rid, {"type": "abort", "message": why})

    # ---- the audit (the controller's thread) ---------------------------------------------------------
    def due(self) -> bool:
        now = time.monotonic()
        if now - self._audit_t < AUDIT_S:
            return False
        with self.lock:
            if not any(now - t >= GRACE_S for t in self.open.values()):
                return False
        self._audit_t = now
        return True

    def audit(self, tokenizer, control_addr: str, fail) -> list[str]:
        """One round (module docstring). ``fail(rids, msg)`` ends requests with a 503. Returns the
        rids found lost in this round."""
        from sgl_elastic.controller import wire

        if tokenizer is None:
            return []
        live = live_rids(tokenizer)
        if live is None:
            return []
        self.ended_elsewhere(live)
        now = time.monotonic()
        with self.lock:
            before = {rid: t for rid, t in self.open.items() if rid in live and now - t >= GRACE_S}
        if not before:
            self._suspects.clear()
            return []
        req_path, reply_path = wire.audit_paths(control_addr)
        self._seq += 1
        seq = self._seq
        try:
            os.unlink(reply_path)
        except FileNotFoundError:
            pass
        tmp = req_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(seq))
        os.replace(tmp, req_path)
        held = None
        deadline = time.monotonic() + REPLY_S
        while time.monotonic() < deadline:
            try:
                with open(reply_path) as f:
                    ans = json.load(f)
                if ans.get("seq") == seq:
                    held = set(ans.get("rids") or [])
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.02)
        if held is None:  # no answer (busy, or a recovery began): withdraw the question, skip the round
            try:
                os.unlink(req_path)
            except FileNotFoundError:
                pass
            return []
        live = live_rids(tokenizer) or set()
        lost = []
        with self.lock:
            missing = {rid: t for rid, t in before.items()
                       if rid not in held and rid in live and self.open.get(rid) == t}
            for rid in [r for r in self._suspects if r not in missing]:
                del self._suspects[rid]
            for rid, t in missing.items():
                if self._suspects.get(rid) == t:
                    lost.append(rid)
                else:
                    self._suspects[rid] = t
        if missing:
            reqtrace.note("audit-miss", list(missing), seq=seq)
        if lost:
            reqtrace.note("lost", lost, seq=seq)
            fail(lost, "sgl-elastic: this request was lost (accepted, but no rank holds it any more); retry it")
            with self.lock:
                for rid in lost:
                    if rid in self.open:
                        del self.open[rid]
                    self._suspects.pop(rid, None)
                self.lost += len(lost)
                self.lost_rids = (self.lost_rids + lost)[-16:]
        return lost

    def snapshot(self) -> dict:
        with self.lock:
            return {"accepted": self.accepted, "finished": self.finished,
                    "errored": sum(self.errored.values()), "errored_by_reason": dict(self.errored),
                    "in_flight": len(self.open), "lost": self.lost, "lost_rids": list(self.lost_rids)}


def live_rids(tokenizer) -> set[str] | None:
    """The rids the tokenizer manager still waits for (None: could not be read now)."""
    for _ in range(5):
        try:
            return {rid for rid, st in list(tokenizer.rid_to_state.items()) if not st.finished}
        except RuntimeError:  # resized while copied (its event loop runs in another thread)
            time.sleep(0.005)
    return None


def _reason_key(msg: str) -> str:
    """A short, stable key for an abort message (its counts are grouped by it)."""
    low = msg.lower()
    for key, words in (("failover: not resumable", ("could not be resumed", "could not be")),
                       ("fallback restart", ("schedulers restarted",)),
                       ("lost", ("was lost (accepted",)),
                       ("server failed", ("cannot serve",)),
                       ("shutting down", ("shutting down", "drain")),
                       ("client gone", ("client", "disconnect"))):
        if any(w in low for w in words):
            return key
    return msg[:60]
