#!/usr/bin/env python3
"""Renders bench/compare.sh's raw results (latest.jsonl) as the Markdown comparison table.

    python3 bench/render.py bench/results/latest.jsonl > bench/results/latest.md

The first line of the input is {"meta": {...}} (what was run, on which machine); every other
line is one `stratus bench mqtt --format json` report with "run" and "broker" added.
"""

import json
import statistics
import sys

NAMES = {"stratus": "Stratus", "mosquitto": "Mosquitto", "rumqttd": "rumqttd"}
# /proc counts CPU time in 10 ms ticks: a share of a shorter window says nothing.
MIN_CPU_WINDOW_SECS = 0.2


def load(path):
    meta, reports = {}, {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if "meta" in r:
                meta = r["meta"]
            else:
                reports[(r["run"], r["broker"], r["scenario"])] = r
    return meta, reports


def fmt(v):
    if v is None:
        return "unknown"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def mean(vals):
    return statistics.mean(vals) if vals else None


def main(path):
    meta, reports = load(path)
    runs = int(meta.get("runs", 1))
    scenarios = meta.get("scenarios") or sorted({k[2] for k in reports})
    brokers = meta.get("brokers") or sorted({k[1] for k in reports})

    def report(run, b, s):
        return reports.get((run, b, s), {"scenario": s, "ok": False, "failure": "no report"})

    def figures(b, s):
        """name -> (unit, better, [values over runs])"""
        out = {}
        for run in range(1, runs + 1):
            for f in report(run, b, s).get("figures", []):
                entry = out.setdefault(f["name"], (f["unit"], f["better"], []))
                if f["value"] is not None:
                    entry[2].append(f["value"])
        return out

    def failed(b, s):
        return any(not report(run, b, s).get("ok") for run in range(1, runs + 1))

    out = []
    out.append("# MQTT brokers compared: Stratus, Mosquitto, rumqttd")
    out.append("")
    out.append(f"- date: {meta.get('date', '?')}")
    out.append(
        f"- machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '?')}), "
        f"{meta.get('mem_gib', '?')} GiB RAM, Linux {meta.get('kernel', '?')}"
    )
    out.append(
        f"- Stratus {meta.get('stratus') or '?'}, Mosquitto {meta.get('mosquitto') or '-'}, "
        f"rumqttd {meta.get('rumqttd') or '-'}"
    )
    out.append(
        f"- `bench/compare.sh --runs {runs} --scale {meta.get('scale', 1)} --timeout {meta.get('timeout', '?')}`: "
        f"figures are the mean of {runs} run(s), each scenario against a fresh broker process"
    )
    out.append("")

    cols = [NAMES.get(b, b) for b in brokers]
    peers = [b for b in brokers if b != "stratus"]
    has_stratus = "stratus" in brokers
    head = ["scenario", "figure"] + cols
    if has_stratus:
        head += [f"Stratus vs {NAMES.get(p, p)}" for p in peers]
        if runs > 1:
            head.append("Stratus spread between runs")
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    starred = False
    for s in scenarios:
        names = []
        for b in brokers:
            for n in figures(b, s):
                # Figures of the machine, not of a broker: listed under *Machine noise*.
                if n not in names and not n.startswith("machine_"):
                    names.append(n)
        for n in names:
            vals, unit, better = {}, "", "higher"
            for b in brokers:
                f = figures(b, s).get(n)
                if f:
                    unit, better = f[0], f[1]
                    vals[b] = mean(f[2])
            row = [s, f"{n} ({unit})"]
            for b in brokers:
                cell = fmt(vals.get(b)) if b in vals else "-"
                row.append(cell + (" ✗" if failed(b, s) else ""))
            if has_stratus:
                sv = vals.get("stratus")
                for p in peers:
                    pv = vals.get(p)
                    if not sv or not pv:
                        row.append("-")
                        continue
                    ratio = sv / pv if better == "higher" else pv / sv
                    mark = ""
                    if failed(p, s) or failed("stratus", s):
                        mark, starred = " *", True
                    row.append(f"{ratio:.2f}×{mark}")
                if runs > 1:
                    f = figures("stratus", s).get(n)
                    v = f[2] if f else []
                    m = mean(v)
                    row.append(f"{(max(v) - min(v)) / abs(m) * 100:.1f}%" if len(v) >= 2 and m else "-")
            out.append("| " + " | ".join(row) + " |")
        row = [s, "lost / expected"]
        for b in brokers:
            cells = []
            for run in range(1, runs + 1):
                r = report(run, b, s)
                cells.append(f"{r['lost']:,} / {r['expected']:,}" if "expected" in r else "-")
            cell = ", ".join(dict.fromkeys(cells))
            row.append(cell + (" ✗" if failed(b, s) else ""))
        if has_stratus:
            row += [""] * (len(peers) + (1 if runs > 1 else 0))
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    out.append("Ratios: how many times better Stratus is: above 1 Stratus is better (rates are Stratus ÷ peer;")
    out.append("latency, memory and time are peer ÷ Stratus). ✗: the scenario failed for that broker (see")
    out.append("*Failures*). Several values in a `lost` cell: one per run.")
    if starred:
        out.append("*: one side did not complete (timeout or loss): the ratio uses its partial figure.")
    out.append("")

    noise = []
    for s in scenarios:
        for b in brokers:
            for run in range(1, runs + 1):
                f = {x["name"]: x["value"] for x in report(run, b, s).get("figures", [])}
                if f.get("machine_hop_p99") is not None:
                    noise.append(f"| {s} | {NAMES.get(b, b)} | {run} | {fmt(f.get('machine_hop_p50'))} | "
                                 f"{fmt(f['machine_hop_p99'])} |")
    if noise:
        out.append("## Machine noise")
        out.append("")
        out.append("The latency scenario's measurement without a broker, just before each latency run and as long")
        out.append("as it (20,000 stamped writes at scale 1, one per 500 µs), from one generator thread straight to")
        out.append("another over loopback TCP (µs). A message through a broker makes this hop twice, each with a")
        out.append("wake-up the broker does not control: latency figures from runs whose hop p99 differ widely do")
        out.append("not compare brokers.")
        out.append("")
        out.append("| scenario | broker | run | direct hop p50 | direct hop p99 |")
        out.append("|---|---|---|---|---|")
        out.extend(noise)
        out.append("")

    out.append("## Load generator CPU")
    out.append("")
    out.append("The generator's CPU time per second of the measured window (100% = one core), then its share")
    out.append("of all CPU time that generator and broker used in that window (the machine has "
               f"{meta.get('nproc', '?')} cores). \"too short\": a window under {MIN_CPU_WINDOW_SECS} s, which")
    out.append("/proc's 10 ms ticks cannot resolve.")
    out.append("")
    out.append("| scenario | " + " | ".join(cols) + " |")
    out.append("|---|" + "---|" * len(cols))
    for s in scenarios:
        row = [s]
        for b in brokers:
            cores, shares, short = [], [], False
            for run in range(1, runs + 1):
                r = report(run, b, s)
                g, w, br = r.get("cpu_secs"), r.get("cpu_window_secs"), r.get("broker_cpu_secs")
                if g is None or not w:
                    continue
                if w < MIN_CPU_WINDOW_SECS:
                    short = True
                    continue
                cores.append(g / w)
                if br is not None and g + br > 0:
                    shares.append(g / (g + br))
            if cores:
                cell = f"{mean(cores) * 100:.0f}% of a core"
                if shares:
                    cell += f", {mean(shares) * 100:.0f}% of all"
            else:
                cell = "too short" if short else "-"
            row.append(cell)
        out.append("| " + " | ".join(row) + " |")
    out.append("")

    out.append("## Failures")
    out.append("")
    any_failure = False
    for b in brokers:
        for s in scenarios:
            runs_failed = [run for run in range(1, runs + 1) if not report(run, b, s).get("ok")]
            for run in runs_failed:
                any_failure = True
                out.append(f"- {NAMES.get(b, b)}, {s}, run {run}: {report(run, b, s).get('failure')}")
            if runs_failed:
                out.append(f"  (reproduce: `bench/compare.sh --brokers {b} --scenarios {s}`)")
    if not any_failure:
        out.append("None: no scenario lost a message it must not lose, and none timed out.")
    out.append("")

    out.append("## Notes")
    out.append("")
    out.append(
        "- Scenarios (see bench/README.md): fanin-qos0/1 = 16 publishers × 62,500 × 64 B → one `t/#` subscriber;"
        " fanin-qos2 = 4 publishers; QoS 1/2 publishers keep at most 64 in flight each; fanout = 1 → 100"
        " subscribers, 10,000 messages; latency = 2,000 msg/s for 10 s; idle = 10,000 connections; retained ="
        " 10,000 retained messages, then a fresh `r/#` subscriber at QoS 1. Counts are at scale 1."
    )
    out.append("- Losses fail fanin-qos1, fanin-qos2, retained and idle; QoS 0 losses are reported only.")
    out.append(
        "- Stratus: `[mqtt] max_queued = 1000000` in a config file (default 1,000: QoS 0 copies beyond it"
        " are dropped), the same limit as Mosquitto's `max_queued_messages`."
    )
    out.append(
        "- Mosquitto: `max_inflight_messages 0`, `max_queued_messages 1000000` (2.0.11 drops QoS 1 under"
        " fan-in otherwise), `max_connections -1`, `persistence false`, `set_tcp_nodelay true` (tuned: without"
        " it Nagle's algorithm adds up to 40 ms to latency), `log_dest none`."
    )
    out.append(
        "- rumqttd: one v4 listener on 127.0.0.1, `next_connection_delay_ms = 0` (tuned: the default 1 ms"
        " caps accepts at 1,000/s), `max_connections = 20010`, `max_payload_size = 1048576`,"
        " `max_inflight_count = 65535`, router segments 10 × 100 MiB per filter (no drops under fan-in)."
    )
    out.append(
        "- RSS per connection: the broker's VmRSS 1 s after the last CONNACK minus before the first"
        " connection, divided by the number of connections."
    )
    out.append(
        "- Generator: `stratus bench mqtt`, one process on a 2-worker tokio runtime, pre-encoded packets"
        " (crates/stratus-bench)."
    )
    out.append("")
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: render.py RESULTS.jsonl")
    main(sys.argv[1])
