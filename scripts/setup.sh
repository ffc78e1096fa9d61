#!/usr/bin/env bash
# Idempotent CPU set-up: creates .venv/ at the repository root with torch (CPU build), SGLang 0.5.23
# without its CUDA closure, the curated CPU dependency set, and sgl-elastic in editable mode, plus
# the CPU compatibility layer (sgl_kernel stand-in, torchvision op schemas) as a .pth hook that is
# active in every process of the venv, SGLang's spawned schedulers included.
# A second run with unchanged inputs only re-checks the environment (a few seconds).
#
# Usage: scripts/setup.sh            (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"
STAMP="$VENV/.sgl-elastic-setup"
TORCH_SPEC="torch==2.13.0"

inputs_hash() {
  cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" "$ROOT/requirements/cpu.txt" \
      "$ROOT/requirements/cpu-nodeps.txt" | sha256sum | cut -d' ' -f1
}

# pip's stderr minus the noise of this machine's optional local indexes ("... is ignored").
pip_quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

self_check() {
  "$VENV/bin/python" -m sgl_elastic.compat.selfcheck "$@"
}

want="$(inputs_hash)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[setup] .venv is up to date; checking it"
  self_check --quick
  exit 0
fi

t0=$SECONDS
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "[setup] error: $PY not found; set PYTHON to a Python >= 3.11 interpreter" >&2
  exit 1
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=(pip_quiet "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)

echo "[setup] installing $TORCH_SPEC (CPU build)"
"${PIP[@]}" -q "$TORCH_SPEC"

echo "[setup] installing the CPU dependency set"
# torch is pinned through a constraint so that no dependency can swap it for a CUDA build.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "$TORCH_SPEC" >"$CONSTRAINTS"
"${PIP[@]}" -q -c "$CONSTRAINTS" -r "$ROOT/requirements/cpu.txt"

ensure_ibverbs() {
  # Mooncake's transfer engine (multi-node daemons) loads libibverbs.so.1 even over TCP.
  if ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; then return 0; fi
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing libibverbs1 (Mooncake's transfer engine loads it)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs1 >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs1 >/dev/null 2>&1; }; then
      return 0
    fi
  fi
  echo "[setup] warning: libibverbs.so.1 is missing and could not be installed (apt-get install libibverbs1):" \
       "multi-node migrations cannot read from peer daemons; their tests are skipped" >&2
}
ensure_ibverbs

echo "[setup] installing SGLang 0.5.23 and friends without their CUDA closure"
"${PIP[@]}" -q --no-deps -r "$ROOT/requirements/cpu-nodeps.txt"

echo "[setup] installing sgl-elastic (editable)"
"${PIP[@]}" -q --no-deps --no-build-isolation -e "$ROOT" 2>/dev/null \
  || "${PIP[@]}" -q --no-deps -e "$ROOT"

echo "[setup] installing the CPU compatibility hook"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp "$ROOT/sgl_elastic/compat/sgl_elastic_compat.pth" "$SITE/"

self_check
echo "$want" >"$STAMP"
echo "[setup] done in $((SECONDS - t0)) s; venv size $(du -sh "$VENV" | cut -f1)"
