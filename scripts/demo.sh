#!/usr/bin/env bash
# The main job: set up (idempotent), then serve the tiny Qwen3-MoE model at tp=3 with the elastic
# server, answer a few requests, and, mid-stream, SIGKILL rank 1 and then rank 0 (in-place
# failovers) and add a rank back. Extra arguments go to `python -m sgl_elastic.demo` (e.g. --once
# to stop after the demo).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" -m sgl_elastic.demo "$@"
