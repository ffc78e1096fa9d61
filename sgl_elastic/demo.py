"""The main job: the elastic server on the tiny Qwen3-MoE model at tp 3, a rank failure, in-place failover.

``python -m sgl_elastic.demo [--tp 3] [--family qwen3-moe] [--once] [-- extra launcher flags]``

Builds (or finds) the tiny checkpoint, starts ``python -m sgl_elastic.launch_server --tp 3`` on
127.0.0.1 (state daemon and failover are on by default), sends a ``/generate`` request and an
OpenAI chat completion and prints the answers. Then, while a stream of requests runs (some
streaming), one rank's process is killed with SIGKILL: the same server goes on at tp 2 on the
survivors, in place; the demo prints the recovery's phases (``/elastic/status``), whether every
request completed, and whether the answers are identical to those before the failure.
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


def _ask(url: str, prompt: str, stream: bool) -> str:
    payload = {"text": prompt, "stream": stream,
               "sampling_params": {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}
    r = requests.post(url + "/generate", json=payload, timeout=300, stream=stream)
    r.raise_for_status()
    if not stream:
        return r.json()["text"]
    text = ""
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            text = json.loads(line[6:])["text"]
    return text


def failover_demo(server: ServerProcess) -> None:
    """A stream of requests; SIGKILL of rank 1 in the middle; the phases; the answers compared."""
    url, auth = server.url, {"Authorization": f"Bearer {TOKEN}"}
    before = [_ask(url, p, stream=False) for p in PROMPTS]
    status = requests.get(url + "/elastic/status", headers=auth, timeout=30).json()
    print(f"[demo] tp {status['tp_size']}, KV-head widths {status['widths']}; starting {len(PROMPTS)} requests"
          " (half of them streaming)", flush=True)
    answers, errors = {}, []

    def run(i: int) -> None:
        try:
            answers[i] = _ask(url, PROMPTS[i], stream=i % 2 == 1)
        except Exception as e:  # noqa: BLE001 - shown below
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = next(r for r in status["ranks"] if r["rank"] == 1)
    print(f"[demo] kill -9 rank 1 (pid {victim['pid']}) while they run", flush=True)
    t0 = time.perf_counter()
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(300)
    done = time.perf_counter() - t0
    status = requests.get(url + "/elastic/status", headers=auth, timeout=30).json()
    rec = status["recoveries"][-1]
    phases = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in rec["phases_s"].items())
    print(f"[demo] recovery {rec['outcome']}: serving again {rec['recovery_s']:.2f} s after the fault ({phases});"
          f" now tp {status['tp_size']}, widths {status['widths']}; {rec['resumed_requests']} requests resumed",
          flush=True)
    same = [answers.get(i) == before[i] for i in range(len(PROMPTS))]
    print(f"[demo] {len(answers)}/{len(PROMPTS)} requests completed ({done:.1f} s after the kill), errors:"
          f" {errors or 'none'}; answers identical to before the failure: {all(same)} {same}", flush=True)
    t1 = time.perf_counter()
    again = _ask(url, PROMPTS[0], stream=False)
    print(f"[demo] a new request after the failover: {time.perf_counter() - t1:.2f} s, same answer:"
          f" {again == before[0]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
