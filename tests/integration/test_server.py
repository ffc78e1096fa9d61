"""`python -m sgl_elastic.launch_server --tp 2` is a drop-in SGLang server.

One server (tiny Qwen3-MoE, tp=2, CPU defaults filled in by the launcher) answers `/generate`,
the OpenAI API through the official `openai` client, and an SGLang frontend program, then shuts
down cleanly on SIGINT with no process of its group left behind.
"""

import pytest
import requests

from sgl_elastic.testing.server import ServerProcess


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = ServerProcess(tiny_models["qwen3-moe"], tp_size=2, extra_args=["--dtype", "float32"])
    srv.start()
    yield srv
    srv.stop()


def test_health_and_server_info(server):
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    info = requests.get(server.url + "/get_server_info", timeout=10).json()
    assert info["tp_size"] == 2
    assert info["device"] == "cpu"  # CPU default filled in by the launcher
    assert info["attention_backend"] == "torch_native"


def test_generate(server):
    r = requests.post(
        server.url + "/generate",
        json={"text": ["hello world", "the expert layer"],
              "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    outs = r.json()
    assert len(outs) == 2
    for out in outs:
        assert out["meta_info"]["completion_tokens"] == 8
        assert len(out["output_ids"]) == 8


def test_openai_chat_and_completions(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "why is the sky blue?"}],
        max_tokens=6, temperature=0, extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 6
    comp = client.completions.create(model="default", prompt="hello", max_tokens=5, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert comp.usage.completion_tokens == 5
    # greedy is deterministic: the same request gives the same text
    again = client.completions.create(model="default", prompt="hello", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == comp.choices[0].text


def test_sglang_frontend_program(server):
    import sglang as sgl

    @sgl.function
    def answer(s, question):
        s += "Q: " + question + "\n"
        s += "A:" + sgl.gen("answer", max_tokens=6, temperature=0, ignore_eos=True)

    backend = sgl.RuntimeEndpoint(server.url)
    state = answer.run(question="what is a tensor?", backend=backend)
    assert isinstance(state["answer"], str) and state["answer"]
    states = answer.run_batch([{"question": "one"}, {"question": "two"}], backend=backend)
    assert all(st["answer"] for st in states)


def test_clean_shutdown_last(server):
    """Runs last in this module: stops the module's server and checks nothing is left."""
    import os

    from sgl_elastic.controller.procs import shm_inodes_of

    srv = server
    members = srv.group_members()
    assert len(members) >= 3  # 2 schedulers + detokenizer, at least
    inodes = shm_inodes_of([srv.proc.pid, *members])
    assert inodes, "SGLang's processes map shared memory (its message queue), none found"
    srv.stop()
    assert not srv.forced_kill, f"SIGINT did not stop the whole server:\n{srv.log_tail()}"
    assert srv.group_members() == []
    left = [e.name for e in os.scandir("/dev/shm") if e.inode() in inodes]
    assert left == [], f"/dev/shm files of the stopped server remain: {left}"
