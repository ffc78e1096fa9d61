"""Pure parts of the failover: the recovery state machine, the control-channel messages, the admin
token, and the fused shard order that lets ranks serve from the daemon's shards (weights held once)."""

import msgspec
import pytest

from sgl_elastic.controller import faults, wire
from sgl_elastic.controller.admin import AdminToken
from sgl_elastic.controller.failover import IllegalPhaseTransition, Phase, transition
from sgl_elastic.layout import ElasticLayout
from sgl_elastic.layout.geometry import rank_tensors
from sgl_elastic.layout.presets import PRESETS, preset_config

pytestmark = pytest.mark.unit

HAPPY = [Phase.SERVING, Phase.FROZEN, Phase.PLANNING, Phase.MIGRATING, Phase.RECONFIGURING, Phase.RESUMING,
         Phase.SERVING]


def test_recovery_phases_in_order_only():
    p = Phase.SERVING
    for nxt in HAPPY[1:]:
        p = transition(p, nxt, "test")
    assert p is Phase.SERVING
    for a, b in [(Phase.SERVING, Phase.PLANNING), (Phase.FROZEN, Phase.MIGRATING), (Phase.SERVING, Phase.FAILED),
                 (Phase.RESUMING, Phase.FROZEN), (Phase.FAILED, Phase.FROZEN), (Phase.SERVING, Phase.RESUMING)]:
        with pytest.raises(IllegalPhaseTransition, match=f"{a.value} -> {b.value}"):
            transition(a, b, "test")
    for a in HAPPY[1:-1]:  # every phase of a recovery may fail
        assert transition(a, Phase.FAILED, "test") is Phase.FAILED
    # a survivor that never checks in: the recovery starts again without it
    assert transition(Phase.RECONFIGURING, Phase.FROZEN, "test") is Phase.FROZEN


def test_wire_round_trip_and_garbage():
    msgs = [wire.RankHello(epoch=0, rank=2, pid=11, reason="RuntimeError: reset"),
            wire.Reconfigure(epoch=1, rank=1, tp_size=2, layout=b"\x01\x02", dist_port=1234, omp_bind="0|1"),
            wire.Retire(epoch=1, reason="no"),
            wire.RankReady(epoch=1, rank=0, pid=11, resumed=3, phases_s={"rebuild": 0.2}),
            wire.RankFailed(epoch=1, rank=0, pid=11, reason="boom")]
    for m in msgs:
        assert wire.decode(wire.encode(m)) == m
    for bad in (b"", b"\xff\x00garbage", msgspec.msgpack.encode({"type": "hello", "epoch": "x"}),
                msgspec.msgpack.encode({"type": "nope"})):
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
            wire.decode(bad)


def test_admin_token(tmp_path):
    t = AdminToken("secret")
    assert t.check("secret") and not t.check("secreT") and not t.check(None) and not t.check("")
    g = AdminToken(None)  # generated, written to a 0600 file
    import os
    import stat

    assert stat.S_IMODE(os.stat(g.path).st_mode) == 0o600
    assert g.check(open(g.path).read())
    g.remove_file()
    assert not os.path.exists(g.path)


def _fused_groups(names):
    """Yield the checkpoint names SGLang fuses into one parameter, grouped, per layer."""
    by_layer = {}
    for n in names:
        if ".layers." in n:
            by_layer.setdefault(n.split(".layers.")[1].split(".")[0], []).append(n)
    for layer in by_layer.values():
        yield [n for n in layer if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj")]
        yield [n for n in layer if ".experts." not in n and n.split(".")[-2] in ("gate_proj", "up_proj")]
        yield [n for n in layer if ".experts." in n and n.split(".")[-2] in ("gate_proj", "up_proj", "w1", "w3")]
        yield [n for n in layer if ".experts." in n and n.split(".")[-2] in ("down_proj", "w2")]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rank_shards_are_in_sglang_fused_order(preset):
    """Each group SGLang fuses (qkv, gate_up, w13, w2) is a run of consecutive shards, in SGLang's order."""
    layout = ElasticLayout.from_hf_config(preset_config(preset), 3)
    for rank in range(layout.tp_size):
        names = [t.name for t, _ in rank_tensors(layout, rank)]
        pos = {n: i for i, n in enumerate(names)}
        for group in _fused_groups(names):
            if not group:
                continue
            idx = [pos[n] for n in group]
            assert idx == list(range(idx[0], idx[0] + len(idx))), group
            kinds = [n.split(".")[-2] for n in group]
            if kinds[0] in ("q_proj",):
                assert kinds == ["q_proj", "k_proj", "v_proj"]
            if ".experts." in group[0] and kinds[0] in ("gate_proj", "w1"):
                experts = [int(n.split(".experts.")[1].split(".")[0]) for n in group]
                assert experts == sorted(experts) and kinds[:2] in (["gate_proj", "up_proj"], ["w1", "w3"])


def test_new_wire_fields_and_paths():
    m = wire.Reconfigure(epoch=2, rank=0, tp_size=2, layout=b"x", dist_port=1, omp_bind="", takeover=b"\x80",
                         daemon_dir="/tmp/d", gpu_slot=3)
    assert wire.decode(wire.encode(m)) == m
    old = wire.Reconfigure(epoch=2, rank=0, tp_size=2, layout=b"x", dist_port=1, omp_bind="")
    assert (old.takeover, old.daemon_dir, old.gpu_slot) == (b"", "", -1)
    assert faults.parse_delays("frozen=2,rebuild=0.5") == {"frozen": 2.0, "rebuild": 0.5}
    assert faults.parse_delays("") == {} and faults.parse_delays(None) == {}
    with pytest.raises(ValueError):
        faults.parse_delays("frozen=soon")
    assert wire.heartbeat_path("ipc:///run/x/control.sock", 42) == "/run/x/heartbeat-42"
    assert wire.regroup_path("ipc:///run/x/control.sock") == "/run/x/regroup"


def test_silent_rank_is_hung_only_past_the_timeout(tmp_path):
    import os
    import time

    from sgl_elastic.controller.failover import FailoverController

    fc = FailoverController()
    fc._dir, fc.hung_timeout_s = str(tmp_path), 3.0
    assert fc.silent_s(7) == 0.0 and fc._hung([7]) == []  # no heartbeat yet: not judged
    beat = tmp_path / "heartbeat-7"
    beat.touch()
    assert fc._hung([7]) == []
    os.utime(beat, (time.time() - 10, time.time() - 10))
    assert fc._hung([7]) == [7] and fc.silent_s(7) > 9
    fc.hung_timeout_s = 0.0  # off
    assert fc._hung([7]) == []


def _req(prompt, out, sent):
    """A real SGLang Req that generated ``out`` and streamed the first ``sent`` tokens."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req("r", "", list(prompt), SamplingParams(max_new_tokens=32))
    stream = []
    req.output_ids = list(out[:sent])
    if sent:
        stream += _send(req)
    req.output_ids = list(out)
    return req, stream


def _send(req):
    """What SGLang's output streamer sends for ``req`` now (its offsets move as SGLang moves them)."""
    ids, _ = req.init_incremental_detokenize()
    chunk = ids[req.send_decode_id_offset:]
    req.send_decode_id_offset = len(ids)
    req.send_token_offset = len(req.output_ids)
    return chunk


@pytest.mark.parametrize("out,sent,delivered", [
    ([5, 6], 2, [5, 6, 7]),  # the dead rank 0 streamed a token the survivors never processed
    ([5, 6, 7], 3, [5, 6]),  # it died before streaming a step they processed
    ([5, 6, 7], 3, [5, 6, 7]),  # in step
    ([5], 1, []),  # the client saw nothing
    ([5, 6, 9], 3, [5, 6, 7]),  # the survivors' continuation diverged from what the client saw
])
def test_align_streams_no_token_twice_or_missing(out, sent, delivered):
    from sgl_elastic.rank.requests import align

    prompt = [1, 2, 3, 4, 8, 9, 10]
    client_req, _ = _req(prompt, delivered, len(delivered))  # what the detokenizer holds for the client
    client = _send(_req(prompt, delivered, 0)[0]) if delivered else []
    req, _ = _req(prompt, out, sent)
    align(req, delivered)
    assert req.output_ids[:len(delivered)] == delivered and req.send_token_offset == len(delivered)
    req.output_ids.append(11)  # the next decode step after the resume
    chunk = _send(req)
    full = req.output_ids
    prefix = _send(_req(prompt, full, 0)[0])[:-len(full)]  # surrounding prompt ids of the first send
    if delivered:
        assert client + chunk == prefix + full, (client, chunk)
    else:
        assert chunk == prefix + full
    assert full[:len(delivered)] == delivered and full[-1] == 11


def test_test_faults_and_server_args_at_new_tp():
    from sgl_elastic.controller.supervisor import server_args_at

    assert faults.parse_faults("rebuild, x,") == {"rebuild", "x"} and faults.parse_faults(None) == frozenset()
    assert transition(Phase.FAILED, Phase.SERVING, "fallback restart") is Phase.SERVING
    from sglang.srt.server_args import ServerArgs

    dense = server_args_at(ServerArgs(model_path="dummy", tp_size=3), 2)
    assert (dense.tp_size, dense.ep_size, dense.model_path) == (2, 1, "dummy")
    ep = server_args_at(ServerArgs(model_path="dummy", tp_size=3, ep_size=3), 2, dist_timeout=5)
    assert (ep.tp_size, ep.ep_size, ep.dist_timeout) == (2, 2, 5)  # experts sharded by rank stay so


class _Proc:
    def __init__(self, pid, alive=True):
        self.pid, self.alive, self.sentinel = pid, alive, None

    def is_alive(self):
        return self.alive


class _Daemon:
    def __init__(self, layout):
        self.layout, self.calls = layout, []

    def stop(self):
        self.calls.append("stop")

    def ensure(self):
        self.calls.append(("ensure", self.layout.tp_size))


def _failed_controller(monkeypatch, restart):
    """A controller whose recovery of rank 1 of 3 failed after the daemon migrated to tp 2."""
    import os
    import threading

    from sgl_elastic.controller import supervisor as sv_mod
    from sgl_elastic.controller.failover import FailoverController, Outcome, Recovery

    cfg = preset_config("Qwen3-14B")
    fc = FailoverController()
    fc._thread = threading.current_thread()  # watch() must not start a detector here
    fc.layout, fc.daemon = ElasticLayout.from_hf_config(cfg, 3), _Daemon(ElasticLayout.from_hf_config(cfg, 2))
    fc.ranks, fc._joiners, fc.departed, fc.epoch = [_Proc(1), _Proc(2, alive=False), _Proc(3)], [_Proc(9)], {2}, 1
    seen = {}
    fc._on_new_layout = lambda layout: seen.setdefault("layout", layout.tp_size)
    fc._omp_bind = lambda tp: "0|1" if tp == 2 else "?"
    monkeypatch.setattr(sv_mod.supervisor(), "restart", lambda reason, procs=None, tp_size=None: restart(
        seen, reason, procs, tp_size))
    monkeypatch.setitem(os.environ, "SGLANG_CPU_OMP_THREADS_BIND", "0|1|0")
    rec = Recovery(epoch=1, reason="rank(s) [1] died", failed_ranks=[1], tp_before=3)
    fc.recoveries.append(rec)
    for p in (Phase.FROZEN, Phase.PLANNING, Phase.MIGRATING, Phase.RECONFIGURING, Phase.FAILED):
        fc._to(rec, p, "test")
    rec.end(Outcome.FAILED, "RuntimeError: survivors could not rebuild")
    return fc, rec, seen


def test_fallback_restarts_every_rank_at_the_daemons_layout(monkeypatch):
    import os

    def restart(seen, reason, procs, tp_size):
        seen.update(reason=reason, procs=[p.pid for p in procs], tp=tp_size,
                    bind=os.environ["SGLANG_CPU_OMP_THREADS_BIND"])
        return [_Proc(11), _Proc(12)]

    fc, rec, seen = _failed_controller(monkeypatch, restart)
    fc._fallback(rec)
    assert seen["tp"] == 2 and seen["layout"] == 2 and seen["bind"] == "0|1"  # the new layout, before the launch
    assert seen["procs"] == [1, 2, 3, 9] and "survivors could not rebuild" in seen["reason"]  # joiner too
    assert fc.phase is Phase.SERVING and [p.pid for p in fc.ranks] == [11, 12] and fc.intake_pid == 11
    assert fc.layout is fc.daemon.layout and not fc.departed and not fc._joiners and not fc.falling_back
    assert fc.status()["tp_size"] == 2 and len(fc.status()["widths"]) == 2
    assert rec.outcome.endswith("; fallback restart at tp 2 done") and rec.fallback == "ok" and rec.tp_after == 2
    assert "failed" in rec.phases_s and fc.daemon.calls == []


def test_fallback_after_a_failed_migration_reloads_the_survivors_layout(monkeypatch):
    def restart(seen, reason, procs, tp_size):
        seen["tp"] = tp_size
        return [_Proc(11), _Proc(12)]

    fc, rec, seen = _failed_controller(monkeypatch, restart)
    fc.daemon.layout = fc.layout  # the daemon did not finish the migration: it says tp 3
    fc._fallback(rec, ElasticLayout.from_hf_config(preset_config("Qwen3-14B"), 2))
    assert fc.daemon.calls == ["stop", ("ensure", 2)] and seen["tp"] == 2 and fc.phase is Phase.SERVING


def test_failed_fallback_leaves_the_server_failed_with_the_reason(monkeypatch):
    def restart(seen, reason, procs, tp_size):
        raise RuntimeError("scheduler 0 died during init")

    fc, rec, _ = _failed_controller(monkeypatch, restart)
    ended = []
    fc.end_server = lambda: ended.append((fc.phase, rec.fallback[:7]))
    fc._fallback(rec)
    assert fc.phase is Phase.FAILED and rec.fallback.startswith("failed: RuntimeError") and not fc.falling_back
    assert ended == [(Phase.FAILED, "failed:")]  # once failed for good, the server is ended
    assert rec.outcome.endswith("fallback restart failed: RuntimeError: scheduler 0 died during init")
    assert fc.daemon.calls == ["stop", ("ensure", 2)]  # tried once more with a new daemon


def test_fallback_tries_once_more_with_a_new_daemon(monkeypatch):
    def restart(seen, reason, procs, tp_size):
        seen["n"] = seen.get("n", 0) + 1
        if seen["n"] == 1:
            raise RuntimeError("daemon error [not_found]")
        assert "again with a new daemon" in reason
        return [_Proc(11), _Proc(12)]

    fc, rec, seen = _failed_controller(monkeypatch, restart)
    fc._fallback(rec)
    assert seen["n"] == 2 and fc.daemon.calls == ["stop", ("ensure", 2)] and fc.phase is Phase.SERVING
    assert rec.fallback.startswith("ok (with a new daemon") and rec.outcome.endswith("fallback restart at tp 2 done")


def test_launch_widths_follow_the_relaunch_args_in_the_launching_process_only():
    from sglang.srt.runtime_context import create_context, get_parallel, use_context
    from sglang.srt.server_args import ServerArgs

    from sgl_elastic.controller.supervisor import _launching, server_args_at

    first = ServerArgs(model_path="dummy", tp_size=3)
    with use_context(create_context(first, role="tokenizer")):  # this process as the first launch left it
        at2 = server_args_at(first, 2)
        at2.resolve_once()
        with _launching(at2):
            assert (get_parallel().tp_size, get_parallel().attn_tp_size, get_parallel().launch_world_size) == (2, 2, 2)
        assert get_parallel().tp_size == 3
        with _launching(first):  # the same widths: nothing overridden (a second fallback at the same tp)
            assert get_parallel().tp_size == 3


def test_peer_failure_tells_a_peer_from_a_rank_of_its_own():
    from sgl_elastic.controller.wire import peer_failure

    peer = [  # what the survivors of a dead or departed peer report (gloo here; NCCL on GPU)
        "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error"
        " [127.0.0.1]:27034: Connection reset by peer. This is typically caused by a remote worker hanging",
        "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:7345",
        "DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network"
        " error, NCCL version 2.21.5 ncclRemoteError",
        "RegroupRequested: the controller asked the ranks to regroup (a rank joins)",
    ]
    own = ["RuntimeError: CUDA error: an illegal memory access was encountered",
           "RuntimeError: SGLE_TEST_RAISE: injected error of TP rank 1 (tests only)",
           "IndexError: index 7 is out of bounds for dimension 0 with size 4", ""]
    assert all(peer_failure(r) for r in peer) and not any(peer_failure(r) for r in own)


def test_sigquit_waits_for_the_killed_rank_to_be_reaped_and_ignores_stale_ones():
    """A peer's SIGQUIT may be handled before the SIGKILLed rank is reaped (its sockets close while
    its memory is torn down): the restart path waits, bounded, for a death instead of tearing the
    server down; one handled just after a restart ended is stale."""
    import multiprocessing as mp
    import time

    from sgl_elastic.controller.supervisor import Supervisor

    ctx = mp.get_context("spawn")
    short, long = ctx.Process(target=time.sleep, args=(1.0,)), ctx.Process(target=time.sleep, args=(60.0,))
    short.start()
    long.start()
    try:
        sv = Supervisor()
        sv.procs = [long]
        t = time.monotonic()
        assert not sv.any_dead(wait_s=0.3)  # bounded: nobody died
        assert 0.25 < time.monotonic() - t < 5
        sv.procs = [short, long]
        assert not sv.any_dead()
        assert sv.any_dead(wait_s=30)  # the short one ends within the wait
        assert not sv.sigquit_is_stale()
        sv.restart_done_at = time.monotonic()
        assert sv.sigquit_is_stale() and not sv.sigquit_is_stale(grace_s=0.0)
    finally:
        for p in (short, long):
            p.kill()
            p.join(timeout=10)
        assert not short.is_alive() and not long.is_alive()


def test_add_rank_past_the_kv_heads_is_refused_before_it_is_accepted():
    """A scale-up the rank processes could not serve (more ranks than KV heads: replication, which the
    patches do not implement) gets a 409 up front and changes nothing; one within the heads is accepted
    (202) and shows pending. (Found by a chaos run: the 202 led to a rebuild every rank refused, then a
    fallback at the same tp that failed too, and the server ended.)"""
    import threading

    from sgl_elastic.controller.failover import FailoverController

    cfg = preset_config("Qwen3-14B")  # 8 KV heads
    fc = FailoverController()
    fc._thread = threading.current_thread()  # watch() must not start a detector here
    fc.enabled, fc._spawn = True, lambda slot, standby: None
    fc.watch([_Proc(100 + r) for r in range(8)])
    fc.layout = ElasticLayout.from_hf_config(cfg, 8)
    err, code = fc.request_add_rank()
    assert code == 409 and "8 KV heads on 9 ranks needs KV-head replication" in err, err
    assert fc.status()["pending"] == []
    fc.watch([_Proc(100 + r) for r in range(7)])
    fc.layout = ElasticLayout.from_hf_config(cfg, 7)
    assert fc.request_add_rank() == (None, 202) and fc.status()["pending"] == ["add_rank"]
    assert fc.request_add_rank()[1] == 409  # one at a time
