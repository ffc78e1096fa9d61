"""Daemon control plane without a socket: message decoding, error replies, the lifecycle machine."""

import os

import msgspec
import pytest

from sgl_elastic.daemon import protocol as P
from sgl_elastic.daemon.server import Daemon, DaemonConfig
from sgl_elastic.daemon.state import DaemonState, IllegalTransition, transition


@pytest.fixture
def daemon():
    d = Daemon(DaemonConfig())  # not bound: handle() only
    d.state = DaemonState.EMPTY
    yield d
    d.store.close()


def req(d, cls, **kw):
    return P.encode(cls(version=P.PROTOCOL_VERSION, token=d._token, **kw))


def test_stats_with_token(daemon):
    r = daemon.handle(req(daemon, P.Stats))
    assert isinstance(r, P.StatsReply) and r.state == "empty" and r.instance == daemon.instance


@pytest.mark.parametrize("data, code", [
    (b"\xc1garbage", P.ErrorCode.MALFORMED),
    (msgspec.msgpack.encode([1, 2, 3]), P.ErrorCode.MALFORMED),
    (msgspec.msgpack.encode({"type": "Stats", "version": 1, "token": "nope"}), P.ErrorCode.UNAUTHORIZED),
    (msgspec.msgpack.encode({"type": "Stats", "version": 1}), P.ErrorCode.UNAUTHORIZED),
])
def test_bad_frames_get_typed_errors(daemon, data, code):
    r = daemon.handle(data)
    assert isinstance(r, P.Error) and r.code == code and r.reason


def test_version_type_and_fields_checked_after_token(daemon):
    tok = daemon._token
    r = daemon.handle(msgspec.msgpack.encode({"type": "Stats", "version": 99, "token": tok}))
    assert r.code == P.ErrorCode.BAD_VERSION and "version 1" in r.reason
    r = daemon.handle(msgspec.msgpack.encode({"type": "Frobnicate", "version": 1, "token": tok}))
    assert r.code == P.ErrorCode.UNKNOWN_TYPE and "ExportWeights" in r.reason
    r = daemon.handle(msgspec.msgpack.encode({"type": "ExportWeights", "version": 1, "token": tok, "rank": -1}))
    assert r.code == P.ErrorCode.INVALID
    r = daemon.handle(msgspec.msgpack.encode({"type": "Stats", "version": 1, "token": tok, "extra": 1}))
    assert r.code == P.ErrorCode.INVALID


def test_state_errors_say_what_to_do(daemon):
    r = daemon.handle(req(daemon, P.ExportWeights, rank=0))
    assert r.code == P.ErrorCode.STATE and "LoadModel" in r.reason
    r = daemon.handle(req(daemon, P.KvMatch, token_ids=[1]))
    assert r.code == P.ErrorCode.NOT_FOUND and "AllocKv" in r.reason


def test_kv_without_model(daemon):
    r = daemon.handle(req(daemon, P.AllocKv, num_layers=2, head_dim=4, num_slots=16, dtype="float16",
                          kv_heads=[1, 1], budget_slots=8))
    assert isinstance(r, P.Ok), r
    r = daemon.handle(req(daemon, P.KvInsert, token_ids=[1, 2], slots=[3, 4]))
    assert isinstance(r, P.KvInsertReply) and r.num_new_tokens == 2
    r = daemon.handle(req(daemon, P.KvMatch, token_ids=[1, 2, 5]))
    assert r.slots == [3, 4]
    r = daemon.handle(req(daemon, P.ExportKv, rank=1))
    assert isinstance(r, P.Handles) and len(r.tensors) == 2 and r.tensors[0].shape == (2, 16, 1, 4)
    r = daemon.handle(req(daemon, P.ExportKv, rank=2))
    assert r.code == P.ErrorCode.NOT_FOUND and "holds ranks [0, 1]" in r.reason


def test_lifecycle_transitions():
    s = transition(DaemonState.STARTING, DaemonState.EMPTY)
    s = transition(s, DaemonState.LOADING)
    s = transition(s, DaemonState.READY)
    s = transition(s, DaemonState.MIGRATING)
    s = transition(s, DaemonState.READY)
    with pytest.raises(IllegalTransition, match="READY -> LOADING.*MIGRATING"):
        transition(s, DaemonState.LOADING)
    s = transition(s, DaemonState.STOPPING)
    assert transition(s, DaemonState.STOPPED) is DaemonState.STOPPED
    with pytest.raises(IllegalTransition, match="none"):
        transition(DaemonState.STOPPED, DaemonState.EMPTY)


def test_run_dir_must_be_private(tmp_path):
    from sgl_elastic.daemon.server import private_run_dir

    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(PermissionError, match="chmod 700"):
        private_run_dir(str(open_dir))
    path, created = private_run_dir(str(tmp_path / "new"))
    assert created and os.stat(path).st_mode & 0o777 == 0o700


def test_config_validates_itself():
    with pytest.raises(ValueError, match="'shm'"):
        DaemonConfig(backend="tpu")
    with pytest.raises(ValueError, match="both checkpoint and layout"):
        DaemonConfig(checkpoint="/x")


def _small_layout():
    from types import SimpleNamespace

    from sgl_elastic.layout import ElasticLayout

    cfg = SimpleNamespace(model_type="qwen3", num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=64, intermediate_size=64, dtype="float32")
    return ElasticLayout.from_hf_config(cfg, 2, mlp_unit=32, vocab_unit=32)


def test_stats_answer_while_loading_and_exports_wait(daemon, tmp_path, monkeypatch):
    import threading

    gate = threading.Event()
    monkeypatch.setattr(daemon.store, "load", lambda *a, **k: gate.wait(10))
    r = daemon.handle(req(daemon, P.LoadModel, checkpoint=str(tmp_path), layout=_small_layout().to_bytes()))
    assert isinstance(r, P.Ok)
    assert daemon.handle(req(daemon, P.Stats)).state == "loading"
    r = daemon.handle(req(daemon, P.ExportWeights, rank=0))
    assert r.code == P.ErrorCode.STATE and "poll Stats" in r.reason
    r = daemon.handle(req(daemon, P.LoadModel, checkpoint=str(tmp_path), layout=_small_layout().to_bytes()))
    assert r.code == P.ErrorCode.STATE
    gate.set()
    daemon._worker.join(10)
    assert daemon.handle(req(daemon, P.Stats)).state == "ready"


def test_failed_load_returns_to_empty_with_the_reason(daemon, tmp_path):
    r = daemon.handle(req(daemon, P.LoadModel, checkpoint=str(tmp_path), layout=_small_layout().to_bytes()))
    assert isinstance(r, P.Ok)
    daemon._worker.join(10)
    s = daemon.handle(req(daemon, P.Stats))
    assert s.state == "empty" and "no *.safetensors files" in s.last_error
    r = daemon.handle(req(daemon, P.LoadModel, checkpoint=str(tmp_path / "nope"), layout=b"\x00"))
    assert r.code == P.ErrorCode.INVALID
