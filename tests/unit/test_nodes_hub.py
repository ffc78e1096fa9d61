"""The controller's node hub and a node's agent (``controller.nodes``), over real ZMQ and TCP sockets
on loopback, with real child processes as ranks: deaths, silence, lifelines, fencing, bad input."""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from types import SimpleNamespace

import msgspec
import pytest
import zmq

from sgl_elastic.controller import nodes
from sgl_elastic.testing.nodes import free_port_run

pytestmark = pytest.mark.timeout(60)


def _sleeper():
    time.sleep(120)


@pytest.fixture
def hub():
    port = free_port_run(3)
    got = []
    h = nodes.NodeHub(f"tcp://127.0.0.1:{port + 1}", 2, on_ranks=lambda node, ranks: got.append((node, ranks)),
                      timeout_s=1.0)
    h.got = got
    yield h
    h.close()


def _dealer(h):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(h.endpoint)
    return s


def _wait(pred, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _send(s, msg):
    s.send(msgspec.msgpack.encode(msg))


def test_control_endpoints_follow_the_rendezvous_address():
    args = SimpleNamespace(dist_init_addr="10.0.0.5:5000")
    assert nodes.control_endpoints(args) == ("tcp://10.0.0.5:5032", "tcp://10.0.0.5:5033")
    assert nodes.control_endpoints(args, 7000) == ("tcp://10.0.0.5:7000", "tcp://10.0.0.5:7001")


def test_hello_death_and_silence(hub):
    s = _dealer(hub)
    try:
        _send(s, nodes.NodeHello(node=1, host="127.0.0.2", ranks=[(2, 111), (3, 112)]))
        _wait(lambda: hub.got, "the hello reached the hub")
        node, ranks = hub.got[0]
        assert node == 1 and [r for r, _ in ranks] == [2, 3] and hub.complete()
        r2, r3 = (p for _, p in ranks)
        assert r2.is_alive() and hub.node_of(112) == 1 and hub.node_of(999) == 0
        _send(s, nodes.RankDied(node=1, pid=112, how="exit -9"))
        ready = multiprocessing.connection.wait([r2.sentinel, r3.sentinel], timeout=5)
        assert ready == [r3.sentinel] and not r3.is_alive() and r2.is_alive()
        # then silence: the node is lost whole after the timeout (no beats are sent here)
        _wait(lambda: not r2.is_alive(), "a silent node is lost", timeout=5)
        assert hub.dead_nodes() == [1] and hub.live_nodes() == [0]
        with pytest.raises(RuntimeError, match="node 1 is lost"):
            hub.daemon_client(1)
    finally:
        s.close(0)


def test_bad_messages_are_dropped_and_change_nothing(hub):
    s, stranger = _dealer(hub), _dealer(hub)
    try:
        s.send(b"\x00not msgpack")
        _send(s, {"type": "node_hello", "node": "one"})  # wrong field type
        _send(stranger, nodes.RankDied(node=1, pid=5, how="forged"))  # a node that never said hello
        _send(s, nodes.NodeHello(node=1, host="127.0.0.2", ranks=[(2, 211)]))
        _wait(lambda: hub.got, "the good hello still works")
        r = hub.got[0][1][0][1]
        _send(stranger, nodes.RankDied(node=1, pid=211, how="forged"))  # not the node's own socket
        for _ in range(3):
            _send(s, nodes.NodeBeat(node=1))
            time.sleep(0.1)
        assert r.is_alive(), "a death reported by another socket than the node's was believed"
    finally:
        s.close(0)
        stranger.close(0)


def test_agent_reports_a_death_at_once_and_fences_only_its_own(hub):
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_sleeper) for _ in range(2)]
    outsider = ctx.Process(target=_sleeper)
    for p in [*ranks, outsider]:
        p.start()
    agent = nodes.NodeAgent(1, "127.0.0.1", hub.endpoint, hung_timeout_s=0)
    try:
        agent.watch(ranks, [2, 3])
        _wait(lambda: hub.got, "the agent said hello")
        remote = dict(hub.got[0][1])
        assert {p.pid for p in remote.values()} == {p.pid for p in ranks}
        hub.fence(1, [outsider.pid])  # not one of the node's ranks: the agent must not kill it
        time.sleep(0.6)
        assert outsider.is_alive()
        t0 = time.monotonic()
        os.kill(ranks[1].pid, signal.SIGKILL)
        assert multiprocessing.connection.wait([remote[3].sentinel], timeout=5), "the death was not reported"
        assert time.monotonic() - t0 < 1.0 and remote[2].is_alive()
        remote[2].kill()  # the controller's fence of a remote rank goes through the agent
        ranks[0].join(5)
        assert not ranks[0].is_alive()
    finally:
        agent.close()
        for p in [*ranks, outsider]:
            if p.is_alive():
                p.kill()
            p.join(5)


def test_a_lifeline_that_closes_loses_the_node_at_once(hub):
    s = _dealer(hub)
    try:
        _send(s, nodes.NodeHello(node=1, host="127.0.0.2", ranks=[(2, 311)]))
        _wait(lambda: hub.got, "hello")
        r = hub.got[0][1][0][1]
        line = socket.create_connection(nodes.lifeline_endpoint(hub.endpoint))
        line.sendall((1).to_bytes(4, "big"))
        time.sleep(0.1)
        _send(s, nodes.NodeBeat(node=1))
        assert r.is_alive()
        t0 = time.monotonic()
        line.close()
        assert multiprocessing.connection.wait([r.sentinel], timeout=0.9), "the closed lifeline was not noticed"
        assert time.monotonic() - t0 < 0.9
    finally:
        s.close(0)
