"""The main job: the elastic server on the tiny Qwen3-MoE model at tp 3, a rank failure, in-place failover.

``python -m sgl_elastic.demo [--tp 3] [--family qwen3-moe] [--once] [-- extra launcher flags]``

Builds (or finds) the tiny checkpoint, starts ``python -m sgl_elastic.launch_server --tp 3`` on
127.0.0.1 (state daemon and failover are on by default), sends a ``/generate`` request and an
OpenAI chat completion and prints the answers. Then, while requests run (some streaming), rank 1's
process is killed with SIGKILL (the same server goes on at tp 2 on the survivors, in place), then
rank 0's (a survivor takes over the request intake: tp 1), then ``POST /elastic/add_rank`` brings a
rank back (tp 2). After each, the demo prints the recovery's phases (``/elastic/status``), whether
every request completed, and whether the answers are identical to those before the failure.
Keeps serving until Ctrl-C (``--once``: stop after the demo).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

import requests

from sgl_elastic.testing.models import FAMILIES, build_model
from sgl_elastic.testing.server import ServerProcess, ServerStartError

TOKEN = "demo-admin-token"
PROMPTS = ["hello world, the server", "the quick brown fox", "elastic tensor parallel", "one two three four"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgl_elastic.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3-moe", choices=FAMILIES)
    parser.add_argument("--tp", type=int, default=3)
    parser.add_argument("--once", action="store_true", help="stop the server after the demo requests")
    parser.add_argument("--failover", action=argparse.BooleanOptionalAction, default=True,
                        help="show a rank failure and the in-place failover (needs --tp > 1)")
    parser.add_argument("extra", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args(argv)

    print(f"[demo] building/finding the tiny {args.family} checkpoint", flush=True)
    model_path = build_model(args.family, "tiny")
    print(f"[demo] checkpoint: {model_path}", flush=True)
    extra = list(args.extra) + ["--dtype", "float32", "--elastic-admin-token", TOKEN]
    server = ServerProcess(model_path, tp_size=args.tp, extra_args=extra)
    print(f"[demo] starting the elastic server at tp={args.tp} on {server.url} "
          f"(log: {server.log_path})", flush=True)
    try:
        server.start()
    except ServerStartError as exc:
        print(f"[demo] error: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"[demo] healthy after {server.start_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        out = requests.post(
            server.url + "/generate",
            json={"text": "hello world, the server", "sampling_params": {"max_new_tokens": 16, "temperature": 0}},
            timeout=120,
        ).json()
        print(f"[demo] /generate ({time.perf_counter() - t0:.2f} s): {out['text']!r} "
              f"(random weights: the words mean nothing)", flush=True)
        chat = requests.post(
            server.url + "/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "why is the sky blue?"}],
                  "max_tokens": 16, "temperature": 0},
            timeout=120,
        ).json()
        print(f"[demo] /v1/chat/completions: {chat['choices'][0]['message']['content']!r}", flush=True)
        if args.failover and args.tp > 1:
            failover_demo(server)
        if args.once:
            return 0
        print(f"[demo] serving on {server.url} (OpenAI base URL {server.url}/v1); Ctrl-C to stop", flush=True)
        while server.proc.poll() is None:
            time.sleep(1)
        print(f"[demo] server exited with {server.proc.returncode}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("[demo] stopping the server", flush=True)
        server.stop()


MAX_NEW = 128  # long enough that the requests are still decoding when the demo kills a rank


def _ask(url: str, prompt: str, stream: bool, started: threading.Event | None = None) -> str:
    """``started`` (streaming only) is set at the first streamed chunk: the request is decoding."""
    payload = {"text": prompt, "stream": stream,
               "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}
    r = requests.post(url + "/generate", json=payload, timeout=300, stream=stream)
    r.raise_for_status()
    if not stream:
        return r.json()["text"]
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            text = json.loads(line[6:])["text"]
            if started is not None:
                started.set()
    return text


def failover_demo(server: ServerProcess) -> None:
    """Requests in flight through three changes: SIGKILL of rank 1, SIGKILL of rank 0 (a survivor
    takes over the intake), then ``POST /elastic/add_rank`` (a new rank joins); phases and answers."""
    url = server.url
    before = [_ask(url, p, stream=False) for p in PROMPTS]
    status = _status(url)
    steps = [("kill", 1), ("kill", 0), ("add", None)] if status["tp_size"] >= 3 else [("kill", 1), ("add", None)]
    for action, rank in steps:
        _step(url, action, rank, before)
    t1 = time.perf_counter()
    again = _ask(url, PROMPTS[0], stream=False)
    print(f"[demo] a new request at the end: {time.perf_counter() - t1:.2f} s, same answer: {again == before[0]}",
          flush=True)


def _status(url: str) -> dict:
    return requests.get(url + "/elastic/status", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()


def _step(url: str, action: str, rank: int | None, before: list[str]) -> None:
    status = _status(url)
    tp = status["tp_size"]
    print(f"[demo] tp {tp}, KV-head widths {status['widths']}; starting {len(PROMPTS)} requests"
          " (half of them streaming)", flush=True)
    answers, errors = {}, []
    started = threading.Event()

    def run(i: int) -> None:
        try:
            answers[i] = _ask(url, PROMPTS[i], stream=i % 2 == 1, started=started)
        except Exception as e:  # noqa: BLE001 - shown below
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    if not started.wait(60):
        print("[demo] warning: no streamed token within 60 s; acting anyway", flush=True)
    time.sleep(0.1)  # every request is decoding now (a few tokens each)
    t0 = time.perf_counter()
    if action == "kill":
        victim = next(r for r in status["ranks"] if r["rank"] == rank)
        print(f"[demo] kill -9 rank {rank} (pid {victim['pid']}) while they run", flush=True)
        os.kill(victim["pid"], signal.SIGKILL)
        want_tp = tp - 1
    else:
        r = requests.post(url + "/elastic/add_rank", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        print(f"[demo] POST /elastic/add_rank while they run: {r.status_code} (a new rank process starts:"
              " SGLang's import takes a while on CPU)", flush=True)
        want_tp = tp + 1
    for t in threads:
        t.join(300)
    answered = time.perf_counter() - t0
    deadline = time.monotonic() + 240
    while not (status := _status(url))["tp_size"] == want_tp or status["state"] != "serving":
        if time.monotonic() > deadline:
            print(f"[demo] error: not serving at tp {want_tp} after 240 s: {status['state']}", flush=True)
            return
        time.sleep(0.5)
    done = time.perf_counter() - t0
    rec = status["recoveries"][-1]
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in rec["phases_s"].items())
    print(f"[demo] {rec['reason']}: {rec['outcome']}, serving again {rec['recovery_s']:.2f} s after it began"
          f" ({phases}); now tp {status['tp_size']}, widths {status['widths']}; {rec['resumed_requests']} requests"
          " resumed", flush=True)
    same = [answers.get(i) == before[i] for i in range(len(PROMPTS))]
    print(f"[demo] {len(answers)}/{len(PROMPTS)} requests completed ({answered:.1f} s after the {action}; serving at"
          f" tp {want_tp} {done:.1f} s after it), errors:"
          f" {errors or 'none'}; answers identical to before: {all(same)} {same}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
