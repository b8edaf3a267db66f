#!/usr/bin/env bash
# Start a local BanaServe cluster: N SGLang workers on CPU (or GPU) behind the router.
#
#   scripts/serve_local.sh [--model smollm2|tiny|DIR] [--workers N] [--port P]
#                          [--policy NAME] [--worker-base-port P] [--logs DIR]
#                          [--kvstore [--kvstore-port P] [--kvstore-ssd DIR] [--kvstore-layerwise]]
#                          [--length-predictor DIR] [--batching POLICY] [--queue-policy POLICY]
#                          [--layer-hosts [--layer-host-base-port P] [--rebalance]]
#                          [-- SGLANG_ARGS...]
#
# Defaults: SmolLM2-135M-Instruct, 2 workers, router on 127.0.0.1:30000, cost_aware policy.
# --kvstore also starts the global KV store (python -m kvstore, 1 GiB RAM + 4 GiB SSD tier under
# --kvstore-ssd, default LOGS/kvstore-ssd) and makes every worker use it as its shared L3;
# --kvstore-layerwise loads store hits layer by layer, overlapped with the forward (CPU).
# --length-predictor DIR: the router annotates requests with a trained output-length predictor
# (python -m profiler_ft train; see docs/profiler_ft.md). --batching POLICY: the router holds
# requests beyond the workers' slots and sends them in SLO-ODBS (or fcfs/spf/s3) batches;
# --queue-policy POLICY: each worker orders its own waiting queue that way (docs/slo_odbs.md).
# --layer-hosts: a layer host beside every worker (ports from 32000), and every worker may migrate
# decoder layers to the others' hosts, named w0, w1, ... (docs/layer_migration.md), or offload
# attention heads' KV there (docs/head_offload.md). --rebalance: the router decides when
# (python -m router --rebalance, docs/rebalancer.md); needs --layer-hosts.
# Prepares the model if needed, starts the workers (each pinned to one core on CPU), waits for
# them, starts the router, prints a curl to try, and stops everything on Ctrl-C.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY="${PYTHON:-$ROOT/.venv/bin/python}"
MODEL=smollm2 N=2 PORT=30000 BASE=31000 POLICY=cost_aware LOGS="$ROOT/logs"
KVSTORE="" KVPORT=30500 KVSSD="" KVLAYER="" LAYERHOSTS="" LHBASE=32000
EXTRA=() ROUTER_EXTRA=() WORKER_EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) MODEL=$2; shift ;;
    --workers) N=$2; shift ;;
    --port) PORT=$2; shift ;;
    --worker-base-port) BASE=$2; shift ;;
    --policy) POLICY=$2; shift ;;
    --logs) LOGS=$2; shift ;;
    --kvstore) KVSTORE=1 ;;
    --kvstore-port) KVPORT=$2; shift ;;
    --kvstore-ssd) KVSSD=$2; shift ;;
    --kvstore-layerwise) KVLAYER=1 ;;
    --length-predictor) ROUTER_EXTRA+=(--length-predictor "$2"); shift ;;
    --batching) ROUTER_EXTRA+=(--batching "$2"); shift ;;
    --queue-policy) WORKER_EXTRA+=(--queue-policy "$2"); shift ;;
    --layer-hosts) LAYERHOSTS=1 ;;
    --layer-host-base-port) LHBASE=$2; shift ;;
    --rebalance) ROUTER_EXTRA+=(--rebalance) ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "serve_local.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -x "$PY" ] || { echo "serve_local.sh: $PY not found; run scripts/setup.sh first" >&2; exit 1; }
if printf '%s\n' "${ROUTER_EXTRA[@]+"${ROUTER_EXTRA[@]}"}" | grep -qx -- --rebalance && [ -z "$LAYERHOSTS" ]; then
  echo "serve_local.sh: --rebalance needs --layer-hosts (the workers need somewhere to send layers)" >&2
  exit 2
fi
mkdir -p "$LOGS"
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  echo "stopping ${#PIDS[@]} processes"
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

case "$MODEL" in smollm2|tiny) "$PY" -m runtime_patches.models prepare "$MODEL" ;; esac
NCPU=$(nproc)
URLS=()
STORE_ARGS=()
if [ -n "$KVSTORE" ]; then
  "$PY" -m kvstore --port "$KVPORT" --http-port $((KVPORT + 1)) --memory-gb 1 \
    --ssd-dir "${KVSSD:-$LOGS/kvstore-ssd}" --ssd-gb 4 > "$LOGS/kvstore.log" 2>&1 &
  PIDS+=($!)
  until grep -q "listening on" "$LOGS/kvstore.log" 2>/dev/null; do
    kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "kvstore failed: $(tail -n 3 "$LOGS/kvstore.log")" >&2; exit 1; }
    sleep 0.5
  done
  echo "kvstore on 127.0.0.1:$KVPORT (stats: curl -s http://127.0.0.1:$((KVPORT + 1))/stats)"
  STORE_ARGS=(--kvstore "127.0.0.1:$KVPORT")
  ROUTER_EXTRA+=(--kvstore "127.0.0.1:$KVPORT")  # cost_aware prices what the store holds
  if [ -n "$KVLAYER" ]; then STORE_ARGS+=(--kvstore-layerwise); fi
fi
for i in $(seq 0 $((N - 1))); do
  port=$((BASE + i))
  HOST_ARGS=()
  if [ -n "$LAYERHOSTS" ]; then
    HOST_ARGS=(--layer-host-port $((LHBASE + i)))
    for j in $(seq 0 $((N - 1))); do
      [ "$j" = "$i" ] || HOST_ARGS+=(--layer-host "w$j=127.0.0.1:$((LHBASE + j))")
    done
  fi
  "$PY" -m runtime_patches.launch --model "$MODEL" --port "$port" --cpus $((i % NCPU)) \
    ${STORE_ARGS[@]+"${STORE_ARGS[@]}"} ${WORKER_EXTRA[@]+"${WORKER_EXTRA[@]}"} ${HOST_ARGS[@]+"${HOST_ARGS[@]}"} --log-file "$LOGS/worker-$i.log" ${EXTRA[@]+-- "${EXTRA[@]}"} > "$LOGS/launch-$i.log" 2>&1 &
  PIDS+=($!)
  URLS+=("http://127.0.0.1:$port")
done
echo "waiting for ${N} workers (logs in $LOGS)"
for i in $(seq 0 $((N - 1))); do
  until grep -q "worker ready" "$LOGS/launch-$i.log" 2>/dev/null; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      echo "worker $i failed to start: $(tail -n 3 "$LOGS/launch-$i.log")" >&2; exit 1
    fi
    sleep 1
  done
  echo "  $(grep "worker ready" "$LOGS/launch-$i.log")"
done
"$PY" -m router --workers "${URLS[@]}" --port "$PORT" --policy "$POLICY" "${ROUTER_EXTRA[@]}" \
  > "$LOGS/router.log" 2>&1 &
PIDS+=($!)
until curl -sf -o /dev/null "http://127.0.0.1:$PORT/health"; do
  kill -0 "${PIDS[-1]}" 2>/dev/null || { echo "router failed: $(tail -n 3 "$LOGS/router.log")" >&2; exit 1; }
  sleep 0.5
done
NAME=$(curl -s "http://127.0.0.1:$PORT/v1/models" | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
cat <<MSG

BanaServe is serving $NAME on http://127.0.0.1:$PORT ($N workers, policy $POLICY). Try:

  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$NAME", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}'

Workers and their load: curl -s http://127.0.0.1:$PORT/workers   Metrics: /metrics
Press Ctrl-C to stop.
MSG
if [ -n "${BANASERVE_SMOKE:-}" ]; then
  curl -sf -i "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$NAME\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"max_tokens\": 32, \"temperature\": 0}"
  echo; exit 0
fi
wait -n "${PIDS[@]}"
echo "a process exited; stopping the cluster" >&2
exit 1
