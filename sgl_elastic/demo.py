"""The main job: the elastic server on the tiny Qwen3-MoE model, answering requests.

``python -m sgl_elastic.demo [--tp 2] [--family qwen3-moe] [--once] [-- extra launcher flags]``

Builds (or finds) the tiny checkpoint, starts ``python -m sgl_elastic.launch_server`` at the given
TP size on 127.0.0.1, sends a ``/generate`` request and an OpenAI chat completion, prints the
answers, and keeps serving until Ctrl-C (``--once``: stop after the answers).

With the state daemon (default; ``--no-daemon`` to skip): after the answers, one scheduler process
is killed with SIGKILL (a rank failure), the server restarts its schedulers from the daemon (no
checkpoint read) while the HTTP server stays up, and the demo asks again: same answer, the prompt's
KV served from the cache that survived, and the time from the kill to the first token.
"""

from __future__ import annotations

import argparse
import sys
import time

import requests

from sgl_elastic.testing.models import FAMILIES, build_model
from sgl_elastic.testing.server import ServerProcess, ServerStartError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sgl_elastic.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3-moe", choices=FAMILIES)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--once", action="store_true", help="stop the server after the demo requests")
    parser.add_argument("--daemon", action=argparse.BooleanOptionalAction, default=True,
                        help="keep weights/KV in the state daemon and show a scheduler crash + restart")
    parser.add_argument("extra", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args(argv)

    print(f"[demo] building/finding the tiny {args.family} checkpoint", flush=True)
    model_path = build_model(args.family, "tiny")
    print(f"[demo] checkpoint: {model_path}", flush=True)
    extra = list(args.extra)
    if args.daemon:
        extra += ["--elastic-daemon"] + ([] if "--max-total-tokens" in extra else ["--max-total-tokens", "8192"])
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
        if args.daemon:
            crash_demo(server, out["text"])
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


def crash_demo(server: ServerProcess, before: str) -> None:
    """SIGKILL one scheduler; wait for the first token from the restarted ones; ask again."""
    import os
    import signal

    import psutil

    sched = {c.name(): c.pid for c in psutil.Process(server.proc.pid).children() if "scheduler_TP" in c.name()}
    victim = max(sched)
    print(f"[demo] crash: kill -9 {victim} (pid {sched[victim]}); the HTTP server stays up", flush=True)
    t0 = time.perf_counter()
    os.kill(sched[victim], signal.SIGKILL)
    while True:
        try:
            r = requests.post(server.url + "/generate", timeout=60, json={
                "text": "hello world, the server", "sampling_params": {"max_new_tokens": 16, "temperature": 0}})
            if r.status_code == 200:
                break
            print(f"[demo]   {r.status_code}: {r.json().get('message', r.text)[:100]}", flush=True)
        except requests.RequestException:
            pass
        if time.perf_counter() - t0 > 300 or server.proc.poll() is not None:
            raise RuntimeError(f"no recovery:\n{server.log_tail()}")
        time.sleep(0.2)
    out = r.json()
    log = server.log_path.read_text(errors="replace")
    log = log[log.rfind("restarting all"):]
    lines = [ln.split("] ", 1)[-1] for ln in log.splitlines()
             if "weights attached published" in ln or "restart 1 done" in ln or "restored" in ln]
    for ln in dict.fromkeys(lines):
        print(f"[demo]   {ln}", flush=True)
    print(f"[demo] first token {time.perf_counter() - t0:.1f} s after the kill; same answer:"
          f" {out['text'] == before}; prompt tokens from the surviving KV: {out['meta_info']['cached_tokens']}",
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
