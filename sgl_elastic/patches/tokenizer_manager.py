"""Patch of SGLang's ``managers/tokenizer_manager.py``: scheduler restart with the state daemon (main process).

Pass-through unless ``launch_server --elastic-daemon`` enabled the supervisor.
"""

from __future__ import annotations

import asyncio
import threading
import time

from sgl_elastic.controller.supervisor import SupervisorState, _log, supervisor


FAILED_GRACE_S = 2.0  # state failed: how long the server answers 503 before SGLang's tear-down ends it
_grace_started: list[float] = []
_teardown_due: list[float] = []


def _helpers_gone() -> list[str]:
    from sgl_elastic.controller.procs import dead_helpers

    return dead_helpers()


def running_phase_sigquit_handler(original, self, signum=None, frame=None):
    """SignalHandler.running_phase_sigquit_handler: a surviving rank's SIGQUIT after a peer died is
    part of the failure the supervisor handles; anything else tears down as before."""
    from sgl_elastic.controller.failover import Phase, controller

    from sgl_elastic.controller.drain import stopping

    fc = controller()
    if stopping():  # Ctrl-C or SIGTERM: the shutdown in progress ends every process (and sweeps /dev/shm)
        _log("SIGQUIT while the server shuts down: left to the shutdown")
        return None
    if fc.armed and fc.enabled and (fc.phase is not Phase.FAILED or fc.falling_back):
        gone = _helpers_gone()
        if not gone:
            _log("SIGQUIT from a scheduler: a rank failure, handled by the failover controller")
            return None
        # the detokenizer sends SIGQUIT when it dies: no failover replaces it, and every request
        # would wait for outputs nobody relays; SGLang's tear-down ends them with a visible error
        _log(f"ERROR: SIGQUIT and {', '.join(gone)} is gone: tearing the server down as SGLang does")
        fc.enabled = False
    elif fc.armed and fc.enabled and fc.health() == "failed" and not _teardown_due:
        # a recovery and its fallback failed: the server cannot serve. SGLang's tear-down ends it,
        # after a short grace in which the requests get their 503 and the probes say "failed" (the
        # SIGQUITs of the retiring ranks meanwhile are part of it).
        if not _grace_started:
            _grace_started.append(time.monotonic())
            _log(f"the server cannot serve (a recovery and its fallback restart failed): it ends in"
                 f" {FAILED_GRACE_S:.0f} s, once every request has its 503")

            def end() -> None:
                _teardown_due.append(time.monotonic())
                running_phase_sigquit_handler(original, self, signum, frame)

            threading.Timer(FAILED_GRACE_S, end).start()
        return None
    sv = supervisor()  # with failover armed, the restart is the controller's own fallback, not this path
    if not fc.armed and sv.enabled and sv._launch is not None and sv.state is not SupervisorState.FAILED and (
            not _helpers_gone()) and (sv.state is SupervisorState.RESTARTING or sv.sigquit_is_stale() or sv.any_dead(wait_s=3.0)):
        _log("SIGQUIT from a scheduler after a rank failure: handled by the restart")
        return None
    if sv.enabled and sv.on_teardown is not None:  # SGLang kills the whole tree next: free the daemon first
        try:
            sv.on_teardown()
        except Exception as e:  # noqa: BLE001 - the tear-down must go on
            _log(f"stopping the daemon before the tear-down failed: {e}")
    return original(self, signum, frame)


def dispatch_to_scheduler(original, self, obj):
    """TokenizerManager._dispatch_to_scheduler: record each request's tokenized input (failover);
    once the server cannot serve (a recovery and its fallback failed), refuse it with a 503."""
    from sgl_elastic.controller.failover import controller

    fc = controller()
    if fc.enabled:
        fc.record_dispatch(self, obj)
        if _refused(self, fc, obj):
            return None
    return original(self, obj)


async def async_dispatch_to_scheduler(original, self, obj):
    """TokenizerManager._async_dispatch_to_scheduler: same, async path."""
    from sgl_elastic.controller.failover import controller

    fc = controller()
    if fc.enabled:
        fc.record_dispatch(self, obj)
        if _refused(self, fc, obj):
            return None
    return await original(self, obj)


def _refused(tm, fc, obj) -> bool:
    """In state ``failed`` (no scheduler will ever answer): end the request at once with a 503
    instead of sending it to a scheduler that is gone (it would wait forever)."""
    from sglang.srt.managers.io_struct import AbortReq

    from sgl_elastic.controller.failover import FAILED_MSG

    if fc.health() != "failed":
        return False
    reqs = [o for o in getattr(obj, "batch", None) or [obj] if isinstance(getattr(o, "rid", None), str)]
    if not reqs or not all(hasattr(o, "input_ids") for o in reqs):
        return False  # not a generation request (an abort, a control message): SGLang's path
    try:
        later = asyncio.get_running_loop().call_soon
    except RuntimeError:  # not on an event loop: at once
        later = lambda fn, arg: fn(arg)  # noqa: E731
    for o in reqs:  # once the caller waits on the request's state (it looks the state up after this)
        later(tm._handle_abort_req, AbortReq(rid=o.rid, abort_message=FAILED_MSG, finished_reason={
            "type": "abort", "message": FAILED_MSG, "status_code": 503}))
    fc.accounts.ended_with_error([o.rid for o in reqs], FAILED_MSG)
    return True


async def handle_batch_output(original, self, recv_obj):
    """TokenizerManager._handle_batch_output: request accounting, time to first success after a
    fault (TFS), and the dispatch records of finished requests dropped."""
    from sgl_elastic.controller.failover import controller

    fc = controller()
    if fc.enabled:
        fc.accounts.outputs(recv_obj)  # before SGLang drops a finished request's state
    out = await original(self, recv_obj)
    if fc.enabled and getattr(recv_obj, "rids", None):
        fc.first_token_after_fault()
        fc.forget_finished(self.rid_to_state)
    return out


def validate_one_request(original, self, obj, input_ids):
    """TokenizerManager._validate_one_request: token ids must lie in [0, vocab size) (a clear 400)."""
    vocab = getattr(getattr(self, "model_config", None), "vocab_size", None)
    if vocab and input_ids:
        bad = next((t for t in input_ids if not isinstance(t, int) or t < 0 or t >= vocab), None)
        if bad is not None:
            raise ValueError(f"input_ids contains {bad!r}, outside the vocabulary: valid ids are 0..{vocab - 1}")
    return original(self, obj, input_ids)
