"""A recovery's phases, its legal moves and its record (``Recovery``, as ``/elastic/status`` shows it).

    SERVING -> FROZEN -> PLANNING -> MIGRATING -> RECONFIGURING -> RESUMING -> SERVING
                 any phase but SERVING -> FAILED (fallback: restart every scheduler from the daemon,
                 at the layout it holds) -> SERVING

A survivor that does not check in (hung) or dies during a recovery abandons it: RECONFIGURING (or,
for a regroup that collects check-ins before any byte moved, MIGRATING) -> FROZEN, and a new
recovery starts from the layout the daemon holds, without it.
"""

from __future__ import annotations

import enum
import logging
import sys

import msgspec

__all__ = ["Phase", "IllegalPhaseTransition", "transition", "Outcome", "Recovery", "log"]

logger = logging.getLogger("sgl_elastic.controller.failover")


def log(msg: str) -> None:
    """The controller's line on stderr (the server log)."""
    print(f"[sgl-elastic failover] {msg}", file=sys.stderr, flush=True)


class Phase(enum.Enum):
    SERVING = "serving"
    FROZEN = "frozen"
    PLANNING = "planning"
    MIGRATING = "migrating"
    RECONFIGURING = "reconfiguring"
    RESUMING = "resuming"
    FAILED = "failed"


_ORDER = (Phase.SERVING, Phase.FROZEN, Phase.PLANNING, Phase.MIGRATING, Phase.RECONFIGURING, Phase.RESUMING,
          Phase.SERVING)
_LEGAL: dict[Phase, frozenset[Phase]] = {a: frozenset({b}) for a, b in zip(_ORDER, _ORDER[1:])}
for _p in (Phase.FROZEN, Phase.PLANNING, Phase.MIGRATING, Phase.RECONFIGURING, Phase.RESUMING):
    _LEGAL[_p] = _LEGAL[_p] | {Phase.FAILED}
_LEGAL[Phase.RECONFIGURING] = _LEGAL[Phase.RECONFIGURING] | {Phase.FROZEN}
_LEGAL[Phase.MIGRATING] = _LEGAL[Phase.MIGRATING] | {Phase.FROZEN}
_LEGAL[Phase.FAILED] = frozenset({Phase.SERVING})  # after the fallback restart


class IllegalPhaseTransition(RuntimeError):
    pass


def transition(current: Phase, new: Phase, why: str) -> Phase:
    if new not in _LEGAL.get(current, frozenset()):
        raise IllegalPhaseTransition(f"recovery phase {current.value} -> {new.value} is not allowed ({why})")
    logger.info("recovery: %s -> %s (%s)", current.value, new.value, why)
    log(f"{current.value} -> {new.value}: {why}")
    return new


class Outcome(enum.Enum):
    """How a recovery ended (``Recovery.result``; ``Recovery.why`` says why)."""

    RUNNING = "running"
    OK = "ok"
    SUPERSEDED = "superseded"  # abandoned for a straggler: a new recovery goes on without it
    FAILED = "failed"  # then the fallback restart (``Recovery.fallback``)


class Recovery(msgspec.Struct, kw_only=True):
    """One recovery, as ``/elastic/status`` shows it. Times in seconds."""

    epoch: int
    reason: str
    failed_ranks: list[int]
    tp_before: int
    tp_after: int = 0
    widths_after: list[int] = []
    phases_s: dict[str, float] = {}
    recovery_s: float = 0.0  # fault seen -> every survivor serving again
    tfs_s: float | None = None  # fault seen -> first token returned after it (set by the tokenizer hook)
    resumed_requests: int = 0
    resubmitted_requests: int = 0  # rank 0 died: inputs it held that the new rank 0 submitted again
    failed_requests: int = 0  # could be neither resumed nor re-submitted: ended with a 503
    migration: dict[str, float] = {}
    result: Outcome = Outcome.RUNNING
    why: str = ""  # for SUPERSEDED / FAILED: the cause (then what the fallback did, "; ..." appended)
    fallback: str = ""  # after a failed one: "" (none) | running | ok | failed: <why> (the restart of every scheduler)
    t_fault: float = 0.0  # monotonic; internal

    def end(self, result: Outcome, why: str = "") -> None:
        self.result, self.why = result, why

    def note(self, more: str) -> None:
        """Append ``more`` to the cause (what the fallback did after a failure)."""
        self.why = f"{self.why}; {more}" if self.why else more

    @property
    def outcome(self) -> str:
        """One line: "running", "ok", or "<result>: <why>" (``/elastic/status``'s ``outcome``)."""
        if self.result in (Outcome.RUNNING, Outcome.OK) and not self.why:
            return self.result.value
        return f"{self.result.value}: {self.why}"

    def to_status(self) -> dict:
        return msgspec.structs.asdict(self) | {"result": self.result.value, "outcome": self.outcome, "t_fault": None}
