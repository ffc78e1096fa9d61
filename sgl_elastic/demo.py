"""The main job: the elastic server on the tiny Qwen3-MoE model, answering requests.

``python -m sgl_elastic.demo [--tp 2] [--family qwen3-moe] [--once] [-- extra launcher flags]``

Builds (or finds) the tiny checkpoint, starts ``python -m sgl_elastic.launch_server`` at the given
TP size on 127.0.0.1, sends a ``/generate`` request and an OpenAI chat completion, prints the
answers, and keeps serving until Ctrl-C (``--once``: stop after the answers).
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
    parser.add_argument("extra", nargs="*", help="extra launcher flags (after --)")
    args = parser.parse_args(argv)

    print(f"[demo] building/finding the tiny {args.family} checkpoint", flush=True)
    model_path = build_model(args.family, "tiny")
    print(f"[demo] checkpoint: {model_path}", flush=True)
    server = ServerProcess(model_path, tp_size=args.tp, extra_args=args.extra)
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


if __name__ == "__main__":
    sys.exit(main())
