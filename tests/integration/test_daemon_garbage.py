"""A real daemon keeps serving whatever it is sent: hypothesis-generated garbage, then a valid Stats."""

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_elastic.daemon import DaemonProcess
from sgl_elastic.daemon import protocol as P
from sgl_elastic.memory.shm import segments_of_pid


@pytest.fixture(scope="module")
def daemon():
    d = DaemonProcess.start()
    c = d.client(timeout=5)
    try:
        yield d, c
    finally:
        c.close()
        d.stop()
        assert segments_of_pid(d.pid) == []


_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
         | st.text(max_size=16) | st.binary(max_size=16))
_value = st.recursive(_leaf, lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
                      max_leaves=16)
# Request types that are safe to fuzz with the right token (no Shutdown; AllocKv would allocate).
_SAFE_TYPES = ["Stats", "LoadModel", "RegisterRank", "ExportWeights", "ExportKv", "KvMatch", "KvInsert", "KvDump",
               "KvRelease", "EvictKv", "ApplyMigration"]
_field_names = st.sampled_from(["rank", "pid", "token_ids", "slots", "pin", "pin_id", "num_slots", "plan", "layout",
                                "checkpoint", "ranks", "owner_pid", "namespace", "bogus"])


@st.composite
def _frames(draw, token: str):
    kind = draw(st.sampled_from(["bytes", "msgpack", "envelope", "typed"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    if kind == "msgpack":
        return msgspec.msgpack.encode(draw(_value))
    if kind == "envelope":  # a known type with a wrong token and/or version
        msg = {"type": draw(st.sampled_from(list(P.REQUEST_TYPES) + ["Nope"])),
               "version": draw(st.integers(-3, 5)),
               "token": draw(st.sampled_from(["", "x", token[:-1] + "A"]))}
        return msgspec.msgpack.encode(msg)
    # the right token and version, a safe type, fields of arbitrary shape
    msg = {"type": draw(st.sampled_from(_SAFE_TYPES)), "version": P.PROTOCOL_VERSION, "token": token}
    msg.update(draw(st.dictionaries(_field_names, _value, max_size=4)))
    return msgspec.msgpack.encode(msg)


def test_garbage_never_stops_the_daemon(daemon):
    d, c = daemon

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        frame = data.draw(_frames(c._token))
        reply = c.send_raw(frame)
        assert isinstance(reply, P.Reply.__args__)  # type: ignore[attr-defined]
        if not isinstance(reply, P.Error):
            # only right-token requests can succeed, and none of them returns data without it
            assert msgspec.msgpack.decode(frame)["token"] == c._token
        assert isinstance(c.stats(), P.StatsReply)

    run()
    s = c.stats()
    assert s.state == "empty" and s.requests > 250 and sum(s.errors.values()) > 0
    assert "internal" not in s.errors, s.errors  # every bad request is classified, none crashed a handler


def test_raw_multiframe_garbage_from_a_dealer(daemon):
    d, c = daemon
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(c.endpoint)
    try:
        for frames in ([b"x"], [b"", b"a", b"\x81"], [b"a"] * 5):
            s.send_multipart(frames)
            assert s.poll(5000), "no reply to multi-frame garbage"
            reply = P.decode_reply(s.recv_multipart()[-1])
            assert isinstance(reply, P.Error) and reply.code == "malformed"
    finally:
        s.close(0)
    assert isinstance(c.stats(), P.StatsReply)


def test_a_servers_daemon_exits_when_its_server_is_gone(tiny_models):
    """``exit_with_parent`` (what a server starts its daemon with): the server SIGKILLed (nothing of it
    runs its clean-up), its daemon notices, frees its segments and exits, within seconds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from transformers import AutoConfig

    from sgl_elastic.layout import ElasticLayout

    path = str(tiny_models["qwen3-moe"])
    code = ("import sys, time\n"
            "from transformers import AutoConfig\n"
            "from sgl_elastic.daemon import DaemonProcess\n"
            "from sgl_elastic.layout import ElasticLayout\n"
            f"lay = ElasticLayout.from_hf_config(AutoConfig.from_pretrained({path!r}), 2)\n"
            f"d = DaemonProcess.start(checkpoint={path!r}, layout=lay, exit_with_parent=True)\n"
            "d.client().wait_ready(timeout=60)\n"
            "print(d.pid, flush=True)\n"
            "time.sleep(600)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(server.stdout.readline())
        assert segments_of_pid(pid), "the daemon holds no segment after loading"
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail("the daemon outlived its server by 15 s")
        assert segments_of_pid(pid) == [], "the daemon exited without freeing its segments"
    finally:
        if server.poll() is None:
            server.kill()
