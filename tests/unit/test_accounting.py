"""Request accounting and the lost-request audit (``controller.accounting``), against rank 0's side of
the audit (``rank.signals.maybe_audit``) running on a real scheduler-shaped object."""

import os
import tempfile
import threading
import time
import types

import pytest

from sgl_elastic.controller import accounting, wire
from sgl_elastic.controller.accounting import RequestAccounts
from sgl_elastic.rank import signals
from sgl_elastic.rank.session import RANK

pytestmark = pytest.mark.unit


class _Req:
    def __init__(self, rid):
        self.rid = rid

    def finished(self):
        return False


def _sched(held):
    return types.SimpleNamespace(running_batch=types.SimpleNamespace(reqs=[_Req(r) for r in held]),
                                 waiting_queue=[], last_batch=None, cur_batch_for_debug=None, chunked_req=None,
                                 grammar_manager=types.SimpleNamespace(grammar_queue=[]))


def _tm(rids):
    return types.SimpleNamespace(rid_to_state={r: types.SimpleNamespace(finished=False) for r in rids})


@pytest.fixture
def rank0(monkeypatch):
    """Rank 0's event loop, answering audits from ``held`` (its audit check every loop)."""
    d = tempfile.mkdtemp(prefix="sgle-acct-")
    addr = f"ipc://{d}/control.sock"
    monkeypatch.setattr(RANK, "control_addr", addr)
    monkeypatch.setattr(accounting, "GRACE_S", 0.0)
    monkeypatch.setattr(accounting, "AUDIT_S", 0.0)
    held, stop = [], threading.Event()

    def loop():
        while not stop.is_set():
            RANK.audit_seen_t = 0.0
            signals.maybe_audit(_sched(list(held)))
            time.sleep(0.01)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    yield addr, held
    stop.set()
    t.join(5)


def _out(rids, reasons):
    return types.SimpleNamespace(rids=rids, finished_reasons=reasons)


def test_counts_each_request_once():
    a = RequestAccounts()
    for r in ("a", "b", "c", "HEALTH_CHECK_1"):
        a.accept(r)
    a.outputs(_out(["a", "b"], [None, {"type": "length", "length": 4}]))
    a.outputs(_out(["a", "b"], [{"type": "abort", "message": "sgl-elastic: ... could not be resumed"}, None]))
    a.outputs(_out(["b"], [{"type": "stop"}]))  # b ended already: not counted twice
    s = a.snapshot()
    assert (s["accepted"], s["finished"], s["errored"], s["in_flight"], s["lost"]) == (3, 1, 1, 1, 0), s
    assert s["errored_by_reason"] == {"failover: not resumable": 1}
    a.ended_elsewhere({"x"})  # c left the tokenizer manager with no output: an error reply
    assert a.snapshot()["errored"] == 2 and a.snapshot()["in_flight"] == 0


def test_audit_finds_a_request_no_rank_holds_after_two_rounds(rank0):
    addr, held = rank0
    a = RequestAccounts()
    tm = _tm(["kept", "gone"])
    for r in tm.rid_to_state:
        a.accept(r)
    held[:] = ["kept"]
    failed = []
    fail = lambda rids, msg: failed.append((rids, msg))  # noqa: E731
    assert a.audit(tm, addr, fail) == []  # first miss: a suspect only (an output may be on its way)
    assert a.audit(tm, addr, fail) == ["gone"]
    assert failed and failed[0][0] == ["gone"] and "lost" in failed[0][1]
    s = a.snapshot()
    assert s["lost"] == 1 and s["lost_rids"] == ["gone"] and s["in_flight"] == 1, s


def test_progress_between_rounds_clears_a_suspect(rank0):
    addr, held = rank0
    a = RequestAccounts()
    tm = _tm(["r"])
    a.accept("r")
    fail = lambda rids, msg: pytest.fail("nothing is lost")  # noqa: E731
    assert a.audit(tm, addr, fail) == []
    time.sleep(0.01)
    a.outputs(_out(["r"], [None]))  # a token arrived: it is alive somewhere
    assert a.audit(tm, addr, fail) == []
    held[:] = ["r"]
    assert a.audit(tm, addr, fail) == [] and a.snapshot()["lost"] == 0


def test_no_answer_skips_the_round(monkeypatch):
    d = tempfile.mkdtemp(prefix="sgle-acct-")
    monkeypatch.setattr(accounting, "GRACE_S", 0.0)
    monkeypatch.setattr(accounting, "REPLY_S", 0.1)
    a = RequestAccounts()
    a.accept("r")
    tm = _tm(["r"])
    addr = f"ipc://{d}/control.sock"
    fail = lambda rids, msg: pytest.fail("nothing is lost without an answer")  # noqa: E731
    for _ in range(3):
        assert a.audit(tm, addr, fail) == []
    assert not os.path.exists(wire.audit_paths(addr)[0]), "the unanswered question was not withdrawn"
