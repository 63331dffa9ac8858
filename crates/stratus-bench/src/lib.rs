//! # stratus-bench
//!
//! The load generator behind `stratus bench mqtt`: it drives an MQTT 3.1.1 broker on this
//! machine (Stratus, Mosquitto, rumqttd, …) through fixed scenarios — fan-in at QoS 0/1/2,
//! fan-out, latency under a steady rate, idle connections, retained messages — and reports
//! each scenario's figures, the messages it lost and the generator's own CPU time, as text or
//! as one JSON object per scenario for `bench/compare.sh`.
//!
//! And behind `stratus bench http` ([`http`]): Stratus's HTTP API under the loads of issue
//! #5 — batched and single-record telemetry ingestion over keep-alive connections, and an
//! aggregation query over ten million stored points — with every answer checked and each
//! figure shown next to its target.
//!
//! And behind `stratus bench coap` ([`coap`]): confirmable telemetry POSTs from 64 UDP
//! clients in a closed loop against the CoAP listener (issue #6), with requests/s, latency
//! percentiles and timeouts.
//!
//! ## Why it is built this way
//! A benchmark of a broker on a two-core machine is only as good as the generator is cheap:
//! every CPU cycle it spends is one the broker does not get. So:
//! - **No MQTT client library.** Packets are built once with the project's own codec
//!   (`stratus_mqtt::encode`) and then only patched: a QoS 0 publisher writes 64 KiB of
//!   pre-encoded PUBLISH packets per syscall, changing four bytes of sequence number per
//!   packet; QoS 1/2 publishers patch the packet identifier into the same template and
//!   refill their in-flight window a quarter at a time (one write, not one per PUBACK).
//! - **A frame scanner on the receive side** ([`wire::next_frame`]) reads only the fixed
//!   header, the topic length and the 20-byte stamp at the start of each payload, out of one
//!   large read buffer per connection; the full codec decodes only CONNACK and SUBACK.
//! - **Several connections per task** on a two-worker tokio runtime ([`group`]), so 16
//!   publishers or 100 subscribers cost a few task wake-ups per batch, not one task each.
//! - **Exact loss accounting**: each payload carries a run tag, a stream (publisher) number,
//!   a sequence number and a send time; subscribers keep a bit per expected message, so
//!   duplicates, strays from other runs and losses are told apart.
//! - **Bounded**: counts are fixed (times `--scale`), every scenario runs under `--timeout`,
//!   and only loopback addresses are accepted as targets.
//! - **HTTP without a client library's extras**: hyper's bare HTTP/1.1 client connection, one
//!   per load loop and polled inside it (no pool, no extra task); bodies come from
//!   templates whose fixed-width timestamps are rewritten in place, so the generator does no
//!   JSON encoding while the clock runs.
//!
//! ## Dependencies
//! - `stratus-mqtt`: the codec (packets are encoded by the same code the broker decodes with).
//! - `stratus-coap`: the CoAP codec, for the same reason (the bench's one request datagram is
//!   encoded by it once and then patched).
//! - `tokio`: sockets and timers; `futures-util`: `FuturesUnordered`, to drive many
//!   connections from one task.
//! - `clap`: the `bench` subcommand's arguments; `serde`/`serde_json`: the JSON report.
//! - `rustix`: raising the open-file limit (10,000 idle connections) without `unsafe`.
//! - `anyhow`: errors that end a scenario and are reported with it.
//! - `hyper` (client, http1), `hyper-util` (`TokioIo`), `http-body-util` (`Full` bodies,
//!   collecting answers): the HTTP client, the same hyper the server is built on; `base64`:
//!   HTTP Basic client authentication for the OAuth token endpoint.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod args;
pub mod client;
pub mod coap;
pub mod group;
pub mod http;
pub mod procfs;
pub mod progress;
pub mod report;
pub mod roles;
pub mod scenarios;
pub mod wire;

use std::process::ExitCode;

pub use args::{BenchArgs, BenchCommand, CoapArgs, HttpArgs, MqttArgs};

/// Runs `stratus bench …`: exit code 0 when every scenario passed, 1 when one lost messages
/// it must not lose, timed out or failed, 2 for a usage error.
pub fn run(args: BenchArgs) -> ExitCode {
    match args.command {
        BenchCommand::Mqtt(mqtt) => run_mqtt(mqtt),
        BenchCommand::Http(http) => run_http(http),
        BenchCommand::Coap(coap) => run_coap(coap),
    }
}

fn run_coap(args: CoapArgs) -> ExitCode {
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("stratus bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(coap::run_plan(&plan));
    runtime.shutdown_background();
    match outcome {
        Ok(report) if report.ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("stratus bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("stratus bench: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

fn run_http(args: HttpArgs) -> ExitCode {
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("stratus bench: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(http::run_plan(&plan));
    runtime.shutdown_background();
    match outcome {
        Ok(reports) if reports.iter().all(|r| r.ok) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("stratus bench: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_mqtt(args: MqttArgs) -> ExitCode {
    let plan = match args.plan() {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("stratus bench: {e}");
            return ExitCode::from(2);
        }
    };
    procfs::raise_open_file_limit();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let all_ok = runtime.block_on(scenarios::run_plan(&plan));
    // Aborted connection tasks may still hold sockets; do not wait for them.
    runtime.shutdown_background();
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
