#!/usr/bin/env bash
# The main job: set up (idempotent), then serve the tiny Qwen3-MoE model at tp=3 with the elastic
# server and answer a few requests. Extra arguments go to `python -m sgl_elastic.demo`
# then mid-stream a SIGKILL of rank 1 and of rank 0 (in-place failovers) and an add_rank (e.g. --once
# to stop after it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
exec "$ROOT/.venv/bin/python" -m sgl_elastic.demo "$@"
