#!/usr/bin/env bash
# The systemd unit test (issue #22): boots systemd in a throwaway container of this machine's
# own OS (`systemd-nspawn --volatile=yes`: a tmpfs root, the host's /usr read-only, a private
# network) with packaging/stratus.service installed verbatim and the binary at
# /usr/local/bin/stratus, and checks the hardened service works:
#
#   - `systemd-analyze verify` accepts the unit; `systemd-analyze security` rates it (printed);
#   - `systemctl start stratus`: listening on 0.0.0.0, running as a dynamic user (not root),
#     state in /var/lib/stratus; /healthz; a device added with the admin secret the service
#     generated; MQTT with its credentials; a CoAP GET;
#   - /etc/stratus/stratus.env turning on CoAPS: a DTLS POST (OpenSSL under
#     MemoryDenyWriteExecute and the system call filter);
#   - `systemctl stop` within 5 s, exit status 0, the journal's `stopped` line.
#
#   tests/container/systemd.sh [BINARY]    (default: $CARGO_TARGET_DIR/ci/stratus)
#
# Needs root and systemd-container (installed with apt when missing).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${1:-${STRATUS_BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/stratus/target}/ci/stratus}}
if [ ! -x "$bin" ]; then
    echo "systemd test: no stratus binary at $bin (cargo build --profile ci -p stratus)" >&2
    exit 1
fi

say() { printf 'systemd: %s\n' "$*"; }
fail() {
    printf 'systemd: FAILED: %s\n' "$*" >&2
    exit 1
}

missing=()
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v coap-client-openssl >/dev/null 2>&1 || missing+=(libcoap3-bin)
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "systemd test: missing ${missing[*]} (apt-get install them as root)" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
[ "$(id -u)" -eq 0 ] || fail "needs root (systemd-nspawn)"

started=$(date +%s)
tmp=$(mktemp -d /tmp/stratus-systemd.XXXXXX)
machine=stratus-unit-$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')
nspawn=""
cleanup() {
    local rc=$?
    set +e
    if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
        if [ "$rc" -ne 0 ] && [ -n "${leader:-}" ]; then
            echo "--- journalctl -u stratus" >&2
            nsenter -t "$leader" -a journalctl -u stratus --no-pager 2>&1 | tail -n 40 >&2
        fi
        kill "$nspawn" # nspawn asks the container's systemd to power off
        for _ in $(seq 100); do
            kill -0 "$nspawn" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$nspawn" 2>/dev/null
        wait "$nspawn" 2>/dev/null
    fi
    if [ "$rc" -ne 0 ] && [ -s "$tmp/boot.log" ]; then
        echo "--- container console" >&2
        sed 's/\x1b\[[0-9;]*m//g' "$tmp/boot.log" | tail -n 20 >&2
    fi
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT

mkdir -p "$tmp/bin"
cp "$bin" "$tmp/bin/stratus"
cp "$repo/packaging/stratus.service" "$tmp/stratus.service"

# The unit as shipped, checked where ExecStart's binary exists.
mkdir -p "$tmp/verify"
sed "s|/usr/local/bin/stratus|$tmp/bin/stratus|g" "$repo/packaging/stratus.service" \
    >"$tmp/verify/stratus.service"
(cd "$tmp/verify" && systemd-analyze verify --man=no ./stratus.service) ||
    fail "systemd-analyze verify"

# /etc is an empty tmpfs. A machine id makes this no first boot, so systemd enables no unit by
# its presets (the host's mosquitto, say, would take port 1883), and firstboot waits for no
# keyboard. --register=no --keep-unit: the host's systemd need not be running.
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$tmp/machine-id"
echo >>"$tmp/machine-id"
systemd-nspawn -D / --volatile=yes --register=no --keep-unit -M "$machine" --private-network \
    --bind-ro="$tmp/machine-id:/etc/machine-id" \
    --bind-ro="$tmp/bin:/usr/local/bin" \
    --bind-ro="$tmp/stratus.service:/etc/systemd/system/stratus.service" \
    -b systemd.firstboot=off systemd.unit=multi-user.target \
    </dev/null >"$tmp/boot.log" 2>&1 &
nspawn=$!

leader=""
for _ in $(seq 100); do
    leader=$(pgrep -P "$nspawn" | head -n 1 || true)
    [ -n "$leader" ] && break
    kill -0 "$nspawn" 2>/dev/null || fail "systemd-nspawn ended"
    sleep 0.1
done
[ -n "$leader" ] || fail "no container"
inside() { nsenter -t "$leader" -a "$@"; }
state=""
for _ in $(seq 300); do
    state=$(inside systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.1
done
case $state in running | degraded) ;; *) fail "the container's systemd is '$state'" ;; esac
say "booted $machine in $(($(date +%s) - started)) s ($state)"

inside systemctl start stratus || fail "systemctl start stratus"
journal() { inside journalctl -u stratus --no-pager -o cat 2>/dev/null; }
for _ in $(seq 100); do
    journal | grep -q '^listening coap ' && break
    sleep 0.1
done
for l in "listening mqtt 0.0.0.0:1883" "listening http 0.0.0.0:8080" "listening coap 0.0.0.0:5683"; do
    journal | grep -qx "$l" || fail "no '$l' in the journal"
done
pid=$(inside systemctl show -p MainPID --value stratus)
uid=$(inside cat "/proc/$pid/status" | awk '/^Uid:/ { print $2 }')
if [ -z "$uid" ] || [ "$uid" -eq 0 ]; then
    fail "the service runs as uid '$uid'"
fi
inside test -s /var/lib/stratus/admin-secret || fail "no /var/lib/stratus/admin-secret"
secret=$(inside cat /var/lib/stratus/admin-secret)
inside curl -fsS --max-time 5 http://127.0.0.1:8080/healthz | grep -q '"status":"ok"' || fail "/healthz"
dev_secret=$(inside /usr/local/bin/stratus device add unit-dev --json \
    --admin-secret-file /var/lib/stratus/admin-secret |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])') || fail "stratus device add"
inside mosquitto_pub -h 127.0.0.1 -p 1883 -i unit-dev -u unit-dev -P "$dev_secret" -q 1 \
    -t devices/unit-dev/telemetry -m '{"unit": 1}' || fail "device publish over MQTT"
inside coap-client-notls -B 5 -m get coap://127.0.0.1:5683/.well-known/core | grep -q '</telemetry>' ||
    fail "CoAP GET /.well-known/core"
say "service up as uid $uid: /healthz, device add, MQTT and CoAP ok"

inside mkdir -p /etc/stratus
echo 'STRATUS_COAP__DTLS=true' | inside tee /etc/stratus/stratus.env >/dev/null
inside systemctl restart stratus
for _ in $(seq 100); do
    journal | grep -q '^listening coaps ' && break
    sleep 0.1
done
psk=$("$bin" device psk unit-dev --secret "$dev_secret")
out=$(inside coap-client-openssl -B 10 -v 6 -u unit-dev -k "$psk" -m post -t 50 -e '{"unit_dtls": 1}' \
    coaps://127.0.0.1:5684/telemetry 2>&1) || true
[[ $out == *"c:2.04"* ]] || fail "CoAPS POST /telemetry: $out"
token=$(inside curl -fsS --max-time 5 -u "admin:$secret" -d grant_type=client_credentials \
    http://127.0.0.1:8080/oauth/token | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
stored=$(inside curl -fsS --max-time 5 -H "Authorization: Bearer $token" \
    http://127.0.0.1:8080/api/v1/devices/unit-dev/telemetry/latest)
[[ $stored == *unit_dtls* && $stored == *'"unit"'* ]] || fail "telemetry: $stored"
say "stratus.env (CoAPS on): DTLS POST stored, with the MQTT record from before the restart"

t0=$(date +%s%N)
inside systemctl stop stratus
stop_ms=$((($(date +%s%N) - t0) / 1000000))
[ "$stop_ms" -lt 5000 ] || fail "systemctl stop took $stop_ms ms"
status=$(inside systemctl show -p ExecMainStatus --value stratus)
[ "$status" = 0 ] || fail "exit status $status"
journal | tail -n 5 | grep -q 'stratus: stopped' || fail "no 'stopped' line at the end of the journal"
security=$(inside systemd-analyze security stratus --no-pager 2>/dev/null | tail -n 1 || true)
say "systemctl stop: ${stop_ms} ms, exit status 0; systemd-analyze security: ${security#*: }"
say "all checks passed in $(($(date +%s) - started)) s"
