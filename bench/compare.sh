#!/usr/bin/env bash
# Stratus against Mosquitto and rumqttd on this machine: every `stratus bench mqtt` scenario
# against each broker in turn — a fresh broker process per scenario, never two brokers at
# once — then one table in bench/results/latest.md (also printed), raw reports in
# bench/results/latest.jsonl.
#
#   bench/compare.sh [--runs N] [--scale F] [--timeout SECS] [--scenarios "fanin-qos0 idle ..."]
#                    [--brokers "stratus mosquitto rumqttd"]
#
# --runs N repeats everything N times; the table shows means and how much each Stratus figure
# varied between runs. Installs Mosquitto (apt) and rumqttd (cargo install, outside the repo
# under ${STRATUS_TOOLS:-$HOME/.cache/stratus/tools}) when they are missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/stratus/target}"
TOOLS="${STRATUS_TOOLS:-$HOME/.cache/stratus/tools}"
RUMQTTD_VERSION=0.20.0

runs=1
scale=1
timeout=120
scenarios="fanin-qos0 fanin-qos1 fanin-qos2 fanout latency idle retained"
brokers="stratus mosquitto rumqttd"

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --scale) scale="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --scenarios) scenarios="$2"; shift 2 ;;
        --brokers) brokers="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$runs" in ''|*[!0-9]*|0) echo "compare.sh: --runs must be a positive integer" >&2; exit 2 ;; esac

step() { printf '\n==> %s\n' "$*" >&2; }

# 10,000 idle connections need as many descriptors in the broker and in the generator.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

STRATUS_REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# bench/results is this script's own output: a change there alone is not a dirty build.
git diff --quiet HEAD -- . ':(exclude)bench/results' 2>/dev/null || STRATUS_REV="$STRATUS_REV+dirty"
step "cargo build --release -p stratus"
cargo build --release -p stratus
STRATUS="$CARGO_TARGET_DIR/release/stratus"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

MOSQUITTO=""
RUMQTTD="$TOOLS/bin/rumqttd"
for b in $brokers; do
    case "$b" in
        stratus) ;;
        mosquitto)
            MOSQUITTO=$(command -v mosquitto || true)
            [ -z "$MOSQUITTO" ] && [ -x /usr/sbin/mosquitto ] && MOSQUITTO=/usr/sbin/mosquitto
            if [ -z "$MOSQUITTO" ]; then
                step "installing mosquitto (apt)"
                as_root apt-get update -qq
                DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
                MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
            fi
            ;;
        rumqttd)
            if [ ! -x "$RUMQTTD" ]; then
                step "installing rumqttd $RUMQTTD_VERSION into $TOOLS"
                # Its lock file pins metrics 0.22.1, which newer rustc rejects (E0521); when the
                # locked build fails, let cargo pick compatible patch releases instead.
                env -u CARGO_TARGET_DIR cargo install rumqttd --version "$RUMQTTD_VERSION" --locked --root "$TOOLS" \
                    || env -u CARGO_TARGET_DIR cargo install rumqttd --version "$RUMQTTD_VERSION" --root "$TOOLS"
            fi
            ;;
        *) echo "compare.sh: unknown broker $b (stratus, mosquitto, rumqttd)" >&2; exit 2 ;;
    esac
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/stratus-compare.XXXXXX")
BROKER_PID=""
BROKER_PORT=""

stop_broker() {
    if [ -n "$BROKER_PID" ]; then
        kill -TERM "$BROKER_PID" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$BROKER_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$BROKER_PID" 2>/dev/null || true
        wait "$BROKER_PID" 2>/dev/null || true
        BROKER_PID=""
    fi
}
cleanup() { stop_broker; rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 100); do
        if python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()' "$1" 2>/dev/null; then
            return 0
        fi
        kill -0 "$BROKER_PID" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# The broker configurations (also quoted in the table notes).
write_configs() {
    cat > "$WORK/stratus.toml" <<'EOF'
# QoS 0 copies beyond max_queued are dropped (default 1000); Mosquitto gets the same 1,000,000.
[mqtt]
max_queued = 1000000
EOF
}

mosquitto_conf() { # PORT
    cat <<EOF
listener $1 127.0.0.1
allow_anonymous true
max_inflight_messages 0
max_queued_messages 1000000
max_connections -1
persistence false
set_tcp_nodelay true
log_dest none
EOF
}

rumqttd_conf() { # PORT
    cat <<EOF
id = 0

[router]
id = 0
max_connections = 20010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$1"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 65535
    dynamic_filters = true
EOF
}

start_broker() { # NAME TAG
    local name=$1 tag=$2 dir="$WORK/$2"
    mkdir -p "$dir"
    case "$name" in
        stratus)
            "$STRATUS" serve --config "$WORK/stratus.toml" --allow-anonymous --mqtt-port 0 --http-port 0 \
                --data-dir "$dir/data" >"$dir/stdout" 2>"$dir/stderr" &
            BROKER_PID=$!
            BROKER_PORT=""
            for _ in $(seq 100); do
                BROKER_PORT=$(sed -n 's/^listening mqtt .*:\([0-9]*\)$/\1/p' "$dir/stdout" | head -n1)
                [ -n "$BROKER_PORT" ] && break
                kill -0 "$BROKER_PID" 2>/dev/null || break
                sleep 0.1
            done
            ;;
        mosquitto)
            BROKER_PORT=$(free_port)
            mosquitto_conf "$BROKER_PORT" >"$dir/mosquitto.conf"
            "$MOSQUITTO" -c "$dir/mosquitto.conf" >"$dir/stdout" 2>"$dir/stderr" &
            BROKER_PID=$!
            ;;
        rumqttd)
            BROKER_PORT=$(free_port)
            rumqttd_conf "$BROKER_PORT" >"$dir/rumqttd.toml"
            "$RUMQTTD" --config "$dir/rumqttd.toml" -q >"$dir/stdout" 2>"$dir/stderr" &
            BROKER_PID=$!
            ;;
    esac
    if [ -z "$BROKER_PORT" ] || ! wait_port "$BROKER_PORT"; then
        echo "compare.sh: $name did not start; its stderr:" >&2
        tail -n 20 "$dir/stderr" >&2 || true
        stop_broker
        return 1
    fi
}

write_configs
mkdir -p "$WORK/results"

# What was measured, first line of the raw results (render.py reads it).
MOSQUITTO_VERSION=$({ [ -n "$MOSQUITTO" ] && "$MOSQUITTO" -h 2>/dev/null | sed -n 's/^mosquitto version //p' | head -n1; } || true)
RUMQTTD_VERSION_SEEN=$({ [ -x "$RUMQTTD" ] && "$RUMQTTD" --version 2>/dev/null | awk '{print $2}'; } || true)
RAW="$WORK/latest.jsonl"
python3 - "$RAW" <<PY
import json, platform, os, sys, time
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:")), 0)
json.dump({"meta": {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "nproc": len(os.sched_getaffinity(0)),
    "cpu": cpu, "mem_gib": round(mem / 1048576), "kernel": platform.release(),
    "runs": $runs, "scale": "$scale", "timeout": "$timeout",
    "scenarios": "$scenarios".split(), "brokers": "$brokers".split(),
    "stratus": "$STRATUS_REV", "mosquitto": "$MOSQUITTO_VERSION", "rumqttd": "$RUMQTTD_VERSION_SEEN",
}}, open(sys.argv[1], "w"))
open(sys.argv[1], "a").write("\n")
PY

for run in $(seq "$runs"); do
    for broker in $brokers; do
        for scenario in $scenarios; do
            tag="run$run.$broker.$scenario"
            step "run $run/$runs: $scenario against $broker"
            out="$WORK/results/$tag.json"
            if ! start_broker "$broker" "$tag"; then
                echo "{\"scenario\":\"$scenario\",\"ok\":false,\"failure\":\"broker did not start\"}" >"$out"
            else
                set +e
                # The generator bounds itself with --timeout; the outer limit is a last resort.
                timeout $((${timeout%.*} + 60)) "$STRATUS" bench mqtt --scenario "$scenario" --port "$BROKER_PORT" \
                    --broker-pid "$BROKER_PID" --scale "$scale" --timeout "$timeout" --format json >"$out"
                rc=$?
                set -e
                stop_broker
                [ -s "$out" ] || echo "{\"scenario\":\"$scenario\",\"ok\":false,\"failure\":\"no report (generator exit code $rc)\"}" >"$out"
            fi
            sed 's/^/    /' "$out" >&2
            tail -n1 "$out" | sed "s/^{/{\"run\":$run,\"broker\":\"$broker\",/" >>"$RAW"
        done
    done
done

step "writing bench/results/latest.md"
mkdir -p "$ROOT/bench/results"
cp "$RAW" "$ROOT/bench/results/latest.jsonl"
python3 "$ROOT/bench/render.py" "$ROOT/bench/results/latest.jsonl" >"$ROOT/bench/results/latest.md"
cat "$ROOT/bench/results/latest.md"
