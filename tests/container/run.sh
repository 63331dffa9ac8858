#!/usr/bin/env bash
# The container test (issue #22): builds the Dockerfile's `runtime` stage with Podman from a
# binary already built (no registry is reachable, so no base image is pulled: the stage is
# FROM scratch and gets packaging/rootfs.sh's files through `--build-arg ROOTFS=prebuilt`),
# runs it with ports published on loopback and checks it as a user would:
#
#   - the image: non-root user 10001, VOLUME /data, the six ports, HEALTHCHECK, no shell,
#     no debug info, under 40 MB;
#   - listeners bound to 0.0.0.0 inside, the process running as uid 10001, the volume's files
#     its own; `/healthz` and the dashboard through the mapped HTTP port; the image's
#     HEALTHCHECK (`podman healthcheck run`);
#   - a device registered with the admin secret from STRATUS_ADMIN_SECRET (host CLI over the
#     mapped port; `stratus device list` inside the container): MQTT with its credentials,
#     CoAPS (DTLS PSK, OpenSSL in the image) through the mapped UDP port; anonymous MQTT
#     (STRATUS_AUTH__ALLOW_ANONYMOUS) pub/sub and a retained message; a CoAP GET of
#     /.well-known/core through the mapped UDP port;
#   - `podman stop` (SIGTERM) done within 5 s, exit status 0, the log's last line `stopped`;
#   - `podman start`: the retained message, the device and its telemetry are still there;
#   - a new container on the same named volume with STRATUS_DEMO=true (compose's switch):
#     the demo fleet shows up, the admin secret is still the first one.
#
#   tests/container/run.sh [BINARY]    (default: $CARGO_TARGET_DIR/ci/stratus)
#
# Everything Podman keeps (images, containers, volumes, its database) lives in a temporary
# directory with its own containers.conf and storage.conf, removed at the end: the host's
# Podman state is never touched. Installs podman, runc and the clients with apt when missing
# (Debian, as root). Prints the image size and the cold start (container start → the
# `listening` lines).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${1:-${STRATUS_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/stratus/target}/ci/stratus}}
if [ ! -x "$bin" ]; then
    echo "container test: no stratus binary at $bin (cargo build --profile ci -p stratus)" >&2
    exit 1
fi

say() { printf 'container: %s\n' "$*"; }
fail() {
    printf 'container: FAILED: %s\n' "$*" >&2
    exit 1
}

# --- tools -----------------------------------------------------------------------------------
missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v runc >/dev/null 2>&1 || missing+=(runc)
# Published ports are iptables rules (CNI portmap); strip and ldd assemble the image.
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v strip >/dev/null 2>&1 || missing+=(binutils)
command -v ldd >/dev/null 2>&1 || missing+=(libc-bin)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v coap-client-openssl >/dev/null 2>&1 || missing+=(libcoap3-bin)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "container test: missing ${missing[*]} (apt-get install them as root)" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi

# --- a private Podman ------------------------------------------------------------------------
tmp=$(mktemp -d /tmp/stratus-container.XXXXXX)
id=$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
image=localhost/stratus-ci-$id
ctr=stratus-ci-$id
ctr2=stratus-ci-demo-$id
vol=stratus-ci-data-$id

# runc, not crun (crun fails here on cgroup v1 and setrlimit); no default ulimits; cgroupfs
# (no systemd); state, locks and events in $tmp.
cat >"$tmp/containers.conf" <<EOF
[containers]
default_ulimits = []

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$tmp/events.log"
tmp_dir = "$tmp/libpod"
static_dir = "$tmp/storage/libpod"
volume_path = "$tmp/storage/volumes"
lock_type = "file"

[network]
network_config_dir = "$tmp/net"
EOF
driver=${STRATUS_PODMAN_STORAGE_DRIVER:-overlay}
write_storage_conf() {
    cat >"$tmp/storage.conf" <<EOF
[storage]
driver = "$1"
graphroot = "$tmp/storage"
runroot = "$tmp/run"
EOF
}
write_storage_conf "$driver"
export CONTAINERS_CONF=$tmp/containers.conf
export CONTAINERS_STORAGE_CONF=$tmp/storage.conf
# Without systemd Podman cannot schedule health checks (this test runs them itself) and says
# so on every start; that line is noise here.
podman() { command podman "$@" 2> >(grep -v 'unable to get systemd connection' >&2); }

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" -ne 0 ] && [ -n "${ctr:-}" ]; then
        for c in "$ctr" "$ctr2"; do
            if command podman container exists "$c" 2>/dev/null; then
                echo "--- podman logs $c" >&2
                command podman logs "$c" 2>&1 | tail -n 40 >&2
            fi
        done
    fi
    command podman rm -f -t 0 "$ctr" "$ctr2" >/dev/null 2>&1
    command podman volume rm -f "$vol" >/dev/null 2>&1
    command podman rmi -f "$image" >/dev/null 2>&1
    command podman image prune -f >/dev/null 2>&1
    # Anything still mounted under $tmp (an overlay left by a killed run) before removing it.
    awk -v t="$tmp" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r |
        while read -r m; do umount -l "$m"; done
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT

if ! command podman info >/dev/null 2>&1 && [ "$driver" = overlay ]; then
    say "overlay storage does not work here; using vfs"
    driver=vfs
    write_storage_conf vfs
fi
command podman info >/dev/null || fail "podman does not work"

started=$(date +%s)

# --- the image -------------------------------------------------------------------------------
mkdir -p "$tmp/context"
"$repo/packaging/rootfs.sh" "$bin" "$tmp/context/image"
if readelf -S -W "$tmp/context/image/base/usr/local/bin/stratus" | grep -qE '\.debug_(info|line|str|abbrev|ranges) '; then
    fail "the image's binary still has debug sections"
fi
podman build -q --format docker --build-arg ROOTFS=prebuilt -f "$repo/Dockerfile" \
    -t "$image" "$tmp/context" >/dev/null
inspect() { podman image inspect "$image" --format "$1"; }
[ "$(inspect '{{.User}}')" = "10001:10001" ] || fail "image user is $(inspect '{{.User}}')"
[ "$(inspect '{{json .Config.Volumes}}')" = '{"/data":{}}' ] || fail "volumes: $(inspect '{{json .Config.Volumes}}')"
ports=$(inspect '{{json .Config.ExposedPorts}}')
for p in 1883/tcp 8883/tcp 8080/tcp 8443/tcp 5683/udp 5684/udp; do
    [[ $ports == *"\"$p\""* ]] || fail "port $p not exposed: $ports"
done
[ "$(inspect '{{json .HealthCheck.Test}}')" = '["CMD","/usr/local/bin/stratus","healthcheck"]' ] ||
    fail "healthcheck: $(inspect '{{json .HealthCheck}}')"
[ "$(inspect '{{json .Config.Entrypoint}}')" = '["/usr/local/bin/stratus"]' ] ||
    fail "entrypoint: $(inspect '{{json .Config.Entrypoint}}')"
size=$(inspect '{{.Size}}')
say "image $image: $((size / 1000000)) MB ($size bytes), $(inspect '{{json .Config.ExposedPorts}}')"
# 40 MB is the budget of the release image; this one holds the `ci` build (no LTO), which is
# bigger, so a release image always fits when this one does.
[ "$size" -lt 40000000 ] || fail "image is $size bytes, over the 40 MB budget"
if podman run --rm --entrypoint /bin/sh "$image" -c true >/dev/null 2>&1; then
    fail "the image has a shell"
fi

# --- ports -----------------------------------------------------------------------------------
read -r mqtt http coap coaps < <(python3 -c '
import socket
out = []
for kind in (socket.SOCK_STREAM, socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_DGRAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    out.append(s)
print(*(s.getsockname()[1] for s in out))
')
publish=(-p "127.0.0.1:$mqtt:1883" -p "127.0.0.1:$http:8080"
    -p "127.0.0.1:$coap:5683/udp" -p "127.0.0.1:$coaps:5684/udp")
say "host ports: mqtt $mqtt, http $http, coap $coap/udp, coaps $coaps/udp"

# Waits for the `listening` lines of run number $2 (1-based; a restart appends to the log) of
# container $1; prints the seconds from the container's start to the last of them.
wait_listening() {
    local c=$1 run=$2 want=4
    [ "${3:-}" = dtls ] && want=5
    for _ in $(seq 200); do
        if [ "$(podman inspect "$c" --format '{{.State.Running}}')" != true ]; then
            fail "container $c is not running"
        fi
        local n
        n=$(podman logs "$c" 2>/dev/null | grep -c '^listening ' || true)
        [ "$n" -ge $((want * run)) ] && break
        sleep 0.1
    done
    podman logs -t "$c" 2>/dev/null | python3 -c "$startup_py" \
        "$(podman inspect "$c" --format '{{json .State.StartedAt}}')" "$run" "$want"
}
# Reads `podman logs -t`; prints the seconds from StartedAt (argv 1) to the last listening line
# of run argv 2 (argv 3 lines per run).
startup_py='
import datetime, json, re, sys
def ts(s):
    # 2026-12-07T14:40:50.527698236Z, to the microsecond
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?", s)
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    return datetime.datetime.strptime(m.group(1) + "." + frac, "%Y-%m-%dT%H:%M:%S.%f")
started = ts(json.loads(sys.argv[1]))
run, want = int(sys.argv[2]), int(sys.argv[3])
lines = [l.split(" ", 1) for l in sys.stdin.read().splitlines() if " listening " in l]
if len(lines) < run * want:
    sys.exit(f"only {len(lines)} listening lines")
last = ts(lines[run * want - 1][0])
print(f"{(last - started).total_seconds():.3f}")
'

secret="ci-container-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"

# --- first start: the image's own command (`serve`), configured by the environment ------------
podman volume create "$vol" >/dev/null
run_started=$(date +%s.%N)
podman run -d --name "$ctr" -v "$vol:/data" "${publish[@]}" \
    -e STRATUS_ADMIN_SECRET="$secret" \
    -e STRATUS_AUTH__ALLOW_ANONYMOUS=true \
    -e STRATUS_COAP__DTLS=true \
    "$image" >/dev/null
cold=$(wait_listening "$ctr" 1 dtls)
run_wall=$(python3 -c "import time; print(f'{time.time() - $run_started:.3f}')")
say "cold start: ${cold}s from the container's start to its last listening line (${run_wall}s from \`podman run -d\`)"
logs=$(podman logs "$ctr" 2>/dev/null)
for l in "listening mqtt 0.0.0.0:1883" "listening http 0.0.0.0:8080" "listening coap 0.0.0.0:5683" \
    "listening coaps 0.0.0.0:5684"; do
    grep -qx "$l" <<<"$logs" || fail "no line '$l' in the log"
done
grep -q 'admin secret ' <<<"$logs" && fail "a secret was generated although STRATUS_ADMIN_SECRET was given"
pid=$(podman inspect "$ctr" --format '{{.State.Pid}}')
uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
[ "$uids" = "10001 10001 10001 10001" ] || fail "the server runs with uids $uids, not 10001"
data=$(podman volume inspect "$vol" --format '{{.Mountpoint}}')
[ "$(stat -c %u:%g "$data/stratus.db")" = 10001:10001 ] ||
    fail "the volume's files belong to $(stat -c %u:%g "$data/stratus.db")"

base=http://127.0.0.1:$http
health=$(curl -fsS --max-time 5 "$base/healthz") || fail "GET /healthz through the mapped port"
[[ $health == *'"status":"ok"'* ]] || fail "/healthz: $health"
curl -fsS --max-time 5 "$base/" | grep -q '<title>Stratus</title>' || fail "no dashboard at /"
podman healthcheck run "$ctr" >/dev/null || fail "podman healthcheck run"
[ "$(podman inspect "$ctr" --format '{{.State.Health.Status}}')" = healthy ] ||
    fail "health: $(podman inspect "$ctr" --format '{{json .State.Health}}')"
say "/healthz, dashboard and HEALTHCHECK ok"

# A device, registered as an admin would from outside (host CLI, secret from the environment).
dev=ci-dev-$id
added=$(STRATUS_ADMIN_SECRET="$secret" "$bin" device add "$dev" --server "$base" --json) ||
    fail "stratus device add through the mapped port"
dev_secret=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])' <<<"$added")
podman exec "$ctr" stratus device list | grep -q "$dev" || fail "stratus device list inside the container"

# MQTT: the device with its credentials, anonymous clients, a retained message.
mosquitto_pub -h 127.0.0.1 -p "$mqtt" -i "$dev" -u "$dev" -P "$dev_secret" -q 1 \
    -t "devices/$dev/telemetry" -m '{"ci_mqtt": 21.5}' || fail "device publish over MQTT"
if mosquitto_pub -h 127.0.0.1 -p "$mqtt" -i "$dev" -u "$dev" -P wrong -q 1 \
    -t "devices/$dev/telemetry" -m '{"ci_mqtt": 0}' 2>/dev/null; then
    fail "a wrong device secret was accepted"
fi
mosquitto_sub -h 127.0.0.1 -p "$mqtt" -t 'ci/live/#' -C 1 -W 10 >"$tmp/sub.out" &
sub=$!
for _ in $(seq 50); do
    # The subscription is in place once a retained-free publish reaches it; retry until then.
    mosquitto_pub -h 127.0.0.1 -p "$mqtt" -t ci/live/x -m live
    kill -0 "$sub" 2>/dev/null || break
    sleep 0.1
done
wait "$sub" || fail "mosquitto_sub got nothing through the mapped port"
[ "$(cat "$tmp/sub.out")" = live ] || fail "mosquitto_sub got '$(cat "$tmp/sub.out")'"
mosquitto_pub -h 127.0.0.1 -p "$mqtt" -t ci/retained -m kept -r -q 1 || fail "retained publish"

# CoAP over the mapped UDP port; CoAPS with the device's PSK (OpenSSL inside the image).
core=$(coap-client-notls -B 5 -m get "coap://127.0.0.1:$coap/.well-known/core") ||
    fail "CoAP GET /.well-known/core"
[[ $core == *'</telemetry>'* ]] || fail "/.well-known/core: $core"
psk=$("$bin" device psk "$dev" --secret "$dev_secret")
out=$(coap-client-openssl -B 10 -v 6 -u "$dev" -k "$psk" -m post -t 50 -e '{"ci_dtls": 1}' \
    "coaps://127.0.0.1:$coaps/telemetry" 2>&1) || true
[[ $out == *"c:2.04"* ]] || fail "CoAPS POST /telemetry: $out"
say "MQTT (device and anonymous), CoAP and CoAPS through the mapped ports ok"

token() {
    curl -fsS --max-time 5 -u "admin:$secret" -d grant_type=client_credentials "$base/oauth/token" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}
latest() {
    curl -fsS --max-time 5 -H "Authorization: Bearer $(token)" \
        "$base/api/v1/devices/$dev/telemetry/latest"
}
stored=$(latest) || fail "GET telemetry/latest"
[[ $stored == *ci_mqtt* && $stored == *ci_dtls* ]] || fail "telemetry not stored: $stored"

# --- SIGTERM ---------------------------------------------------------------------------------
t0=$(date +%s.%N)
podman stop -t 10 "$ctr" >/dev/null
stop_s=$(python3 -c "import time; print(f'{time.time() - $t0:.3f}')")
code=$(podman inspect "$ctr" --format '{{.State.ExitCode}}')
say "podman stop: ${stop_s}s, exit status $code"
python3 -c "import sys; sys.exit(0 if $stop_s < 5 else 1)" || fail "stop took ${stop_s}s (over 5 s)"
[ "$code" = 0 ] || fail "exit status $code after SIGTERM (137 is a kill)"
podman logs "$ctr" 2>&1 | tail -n 1 | grep -q 'stopped' ||
    fail "the log does not end with a clean stop: $(podman logs "$ctr" 2>&1 | tail -n 2)"

# --- podman start: the volume kept everything -------------------------------------------------
podman start "$ctr" >/dev/null
warm=$(wait_listening "$ctr" 2 dtls)
say "restart: ${warm}s from the container's start to its last listening line"
got=$(mosquitto_sub -h 127.0.0.1 -p "$mqtt" -t ci/retained -C 1 -W 5) || fail "retained message lost"
[ "$got" = kept ] || fail "retained message is '$got'"
stored=$(latest) || fail "GET telemetry/latest after the restart"
[[ $stored == *ci_mqtt* && $stored == *ci_dtls* ]] || fail "telemetry lost: $stored"
mosquitto_pub -h 127.0.0.1 -p "$mqtt" -i "$dev" -u "$dev" -P "$dev_secret" -q 1 \
    -t "devices/$dev/telemetry" -m '{"ci_mqtt": 22}' || fail "device credentials lost"
podman stop -t 10 "$ctr" >/dev/null
say "podman stop / start kept the retained message, the device and its telemetry"

# --- a new container on the same volume, the demo switched on as compose does -----------------
podman run -d --name "$ctr2" -v "$vol:/data" "${publish[@]}" -e STRATUS_DEMO=true \
    "$image" >/dev/null
wait_listening "$ctr2" 1 >/dev/null
grep -qx "dashboard http://127.0.0.1:8080/" <<<"$(podman logs "$ctr2" 2>/dev/null)" ||
    fail "no dashboard line from --demo"
demo=""
for _ in $(seq 100); do
    demo=$(curl -fsS --max-time 5 -H "Authorization: Bearer $(token)" "$base/api/v1/devices" || true)
    [[ $demo == *demo-0012* ]] && break
    sleep 0.2
done
[[ $demo == *demo-0012* && $demo == *"$dev"* ]] || fail "demo fleet or device missing: $demo"
podman stop -t 10 "$ctr2" >/dev/null
[ "$(podman inspect "$ctr2" --format '{{.State.ExitCode}}')" = 0 ] || fail "demo container exit status"
say "STRATUS_DEMO=true on the same volume: demo fleet up, first admin secret still valid"

say "all checks passed in $(($(date +%s) - started)) s (image $((size / 1000000)) MB, cold start ${cold}s)"
