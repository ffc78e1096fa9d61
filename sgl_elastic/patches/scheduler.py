"""Patch of SGLang's ``managers/scheduler.py``: in-place failover of a surviving scheduler process.

Pass-through unless the failover controller's endpoint (``SGLE_CONTROL``) was set at plugin load.
The failover itself is ``rank.failover``.
"""

from __future__ import annotations

import os
import traceback

from sgl_elastic.controller import reqtrace
from sgl_elastic.controller import faults
from sgl_elastic.rank import failover, requests, signals

_RAISE_DIR = faults.raise_dir()  # tests only, read once
_DROP = faults.drop_prefix()  # tests only, read once


def run_event_loop(original, self):
    """Scheduler.run_event_loop: on a failed collective, rebuild in place and serve again."""
    sched = self
    del self
    while True:
        try:
            return original(sched)
        except Exception as exc:  # noqa: BLE001 - decided below: failover or SGLang's own path
            if not failover.enabled():
                raise
            first = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"{type(exc).__name__}: {first}"[:300]
            failover.log(f"event loop stopped ({reason}); failing over in place")
            try:
                sched = failover.failover(sched, reason)
            except Exception as e2:  # noqa: BLE001 - cannot rebuild: end as SGLang would
                failover.log(f"ERROR: in-place failover failed: {type(e2).__name__}: {e2}\n{traceback.format_exc()}")
                raise exc from e2


def scheduler_init(original, self, server_args, port_args, *args, **kwargs):
    """Scheduler.__init__: keep port_args (a rebuilt scheduler needs them, with a new rendezvous port)."""
    original(self, server_args, port_args, *args, **kwargs)
    self._sgle_port_args = port_args
    signals.start_heartbeat()
    if reqtrace.on() and _tp_rank() == 0:
        _trace_streams(self)


def _trace_streams(sched) -> None:
    """Trace (``controller.reqtrace``) what rank 0 sends to the detokenizer: finished requests only."""
    if getattr(sched, "output_streamer", None) is None:
        return
    sched.output_streamer = _TracedStreamer(sched.output_streamer)
    brp = getattr(sched, "batch_result_processor", None)
    if brp is not None and hasattr(brp, "output_streamer"):
        object.__setattr__(brp, "output_streamer", sched.output_streamer)  # a frozen dataclass, maybe


class _TracedStreamer:
    """SGLang's output streamer (a slotted class: its method cannot be replaced), with its
    ``stream_output`` traced; everything else goes to the real one."""

    def __init__(self, inner) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value) -> None:
        setattr(self._inner, name, value)

    def stream_output(self, reqs, *args, **kwargs):
        done = [r for r in reqs if r.finished()]
        if done:
            reqtrace.note("stream", [r.rid for r in done], sent_before=[bool(r.finished_output) for r in done],
                          epoch=failover.epoch())
        return self._inner.stream_output(reqs, *args, **kwargs)


def handle_generate_request(original, self, recv_req, *args, **kwargs):
    """Scheduler.handle_generate_request: keep the tokenized input on the Req (to resume it later)."""
    out = original(self, recv_req, *args, **kwargs)
    if failover.enabled():
        for req in reversed(self.waiting_queue):
            if req.rid == recv_req.rid:
                req._sgle_tokenized = recv_req
                break
        else:
            reqtrace.note("not-queued", [recv_req.rid], epoch=failover.epoch())
    return out


def process_input_requests(original, self, recv_reqs):
    """Scheduler.process_input_requests: re-create resumed requests with their output so far; a
    ``Regroup`` marker (scale-up) takes this rank out of its group once the step's requests are queued;
    rank 0 answers the controller's request audit (which requests it holds) once they are queued."""
    out = _process_input_requests(original, self, recv_reqs)
    if failover.enabled() and _tp_rank() == 0:
        signals.maybe_audit(self)
    return out


def _process_input_requests(original, self, recv_reqs):
    if _RAISE_DIR is not None:
        _maybe_raise()
    if _DROP is not None and recv_reqs:
        recv_reqs = [r for r in recv_reqs if not str(getattr(r, "rid", "") or "").startswith(_DROP)]
    if recv_reqs and any(isinstance(r, signals.Regroup) for r in recv_reqs):
        _process_input_requests(original, self, [r for r in recv_reqs if not isinstance(r, signals.Regroup)])
        raise signals.RegroupRequested("the controller asked the ranks to regroup (a rank joins)")
    if not recv_reqs or not any(isinstance(r, requests.ResumeReq) for r in recv_reqs):
        return original(self, recv_reqs)
    rest = []
    for r in recv_reqs:
        if isinstance(r, requests.ResumeReq):
            requests.resume(self, r)
        else:
            rest.append(r)
    return original(self, rest)


_tokenizers: dict = {}  # (args, kwargs) -> the tokenizer loaded once in this scheduler process


def get_tokenizer(original, *args, **kwargs):
    """``get_tokenizer`` as the scheduler and its TP worker call it: loaded once per process.

    SGLang loads the same tokenizer twice per scheduler (``Scheduler.init_tokenizer`` and
    ``TpModelWorker``), and a rebuilt scheduler would load it twice more: 0.1-0.16 s of a survivor's
    rebuild on the bench model (py-spy), on its critical path. The arguments are the server's
    (tokenizer path, mode, revision...), equal across a process's schedulers, so the object is
    shared. Pass-through when in-place failover is off."""
    if not failover.enabled():
        return original(*args, **kwargs)
    try:
        key = (args, tuple(sorted(kwargs.items())))
        hash(key)
    except TypeError:  # an argument that is not hashable: no memo
        return original(*args, **kwargs)
    if key not in _tokenizers:
        _tokenizers[key] = original(*args, **kwargs)
    return _tokenizers[key]


def _maybe_raise() -> None:
    """Tests only (``faults.ENV_TEST_RAISE``): this rank's own error, once, when its trigger file exists."""
    from sglang.srt.runtime_context import get_parallel

    rank = get_parallel().tp_rank
    try:
        os.unlink(os.path.join(_RAISE_DIR, f"raise-{rank}"))
    except FileNotFoundError:
        return
    raise RuntimeError(f"{faults.ENV_TEST_RAISE}: injected error of TP rank {rank} (tests only)")


def _tp_rank() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_rank
