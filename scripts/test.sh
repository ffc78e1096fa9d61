#!/usr/bin/env bash
# The test command: set up (idempotent), build the tiny checkpoints, run the default test tiers
# (unit + integration; the gpu tier skips itself without CUDA). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
for family in qwen3-moe mixtral qwen3; do
  .venv/bin/python -m sgl_elastic.testing.models --family "$family" --size tiny >/dev/null
done
exec .venv/bin/python -m pytest "$@"
