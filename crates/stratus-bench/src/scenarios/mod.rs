//! The scenarios and their runner: each under `--timeout`, its report built from the shared
//! [`Progress`] so a scenario cut short still says what it got.

mod fanin;
mod fanout;
mod idle;
mod latency;
mod retained;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stratus_mqtt::QoS;

use crate::args::{Format, Plan, Scenario};
use crate::progress::{percentile, Progress};
use crate::report::{Better, Figure, Report};

/// In-flight window of each QoS 1/2 publisher.
pub const WINDOW: u16 = 64;

/// What a scenario needs to know besides its own constants.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The broker.
    pub addr: SocketAddr,
    /// Run tag stamped into every payload and client id.
    pub run: u32,
    /// Count multiplier.
    pub scale: f64,
    /// The broker's PID, for /proc figures.
    pub broker_pid: Option<u32>,
    /// Where the latency scenario writes its samples, if anywhere.
    pub latency_samples: Option<PathBuf>,
}

impl Ctx {
    /// `n × scale`, rounded, at least 1, as a `u32` count.
    pub fn scaled(&self, n: u64) -> u32 {
        crate::args::scaled(n, self.scale).min(u32::MAX as u64) as u32
    }

    /// A client id unique to this run, at most 23 characters (MQTT 3.1.1's guaranteed size).
    pub fn client_id(&self, role: char, i: usize) -> String {
        format!("{}{i}", self.client_id_prefix(role))
    }

    /// The part of [`client_id`](Ctx::client_id) before the number.
    pub fn client_id_prefix(&self, role: char) -> String {
        format!("sb{:08x}{role}", self.run)
    }
}

/// What a finished scenario adds to the counters: extra figures and remarks.
#[derive(Debug, Default)]
pub struct Extra {
    /// Figures that do not come from the counters (RSS, store rate).
    pub figures: Vec<Figure>,
    /// Remarks for the report.
    pub notes: Vec<String>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = anyhow::Result<T>> + Send>>;

/// Messages (or connections) a scenario expects to arrive.
fn expected(ctx: &Ctx, scenario: Scenario) -> u64 {
    match scenario {
        Scenario::FaninQos0 | Scenario::FaninQos1 => 16 * ctx.scaled(fanin::PER_PUBLISHER) as u64,
        Scenario::FaninQos2 => 4 * ctx.scaled(fanin::PER_PUBLISHER) as u64,
        Scenario::Fanout => fanout::SUBSCRIBERS as u64 * ctx.scaled(fanout::MESSAGES) as u64,
        Scenario::Latency => ctx.scaled(latency::MESSAGES) as u64,
        Scenario::Idle => ctx.scaled(idle::CONNECTIONS) as u64,
        Scenario::Retained => ctx.scaled(retained::MESSAGES) as u64,
    }
}

fn start(ctx: Ctx, scenario: Scenario, progress: Arc<Progress>) -> BoxFuture<Extra> {
    match scenario {
        Scenario::FaninQos0 => Box::pin(fanin::run(ctx, progress, QoS::AtMostOnce, 16)),
        Scenario::FaninQos1 => Box::pin(fanin::run(ctx, progress, QoS::AtLeastOnce, 16)),
        Scenario::FaninQos2 => Box::pin(fanin::run(ctx, progress, QoS::ExactlyOnce, 4)),
        Scenario::Fanout => Box::pin(fanout::run(ctx, progress)),
        Scenario::Latency => Box::pin(latency::run(ctx, progress)),
        Scenario::Idle => Box::pin(idle::run(ctx, progress)),
        Scenario::Retained => Box::pin(retained::run(ctx, progress)),
    }
}

/// A tag for this run: payloads and client ids of other runs are told apart by it.
fn run_tag() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}

/// Runs every scenario of the plan in turn, printing each report as it ends; true when all
/// passed.
pub async fn run_plan(plan: &Plan) -> bool {
    let run = run_tag();
    if plan.format == Format::Text {
        println!(
            "stratus bench mqtt → {} (scale {}, timeout {} s per scenario, run {run:08x})",
            plan.addr,
            plan.scale,
            plan.timeout.as_secs_f64()
        );
    }
    let mut all_ok = true;
    for (i, &scenario) in plan.scenarios.iter().enumerate() {
        if i > 0 {
            // Let the broker finish closing the previous scenario's connections.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let ctx = Ctx {
            addr: plan.addr,
            run: run.wrapping_add(i as u32),
            scale: plan.scale,
            broker_pid: plan.broker_pid,
            latency_samples: plan.latency_samples.clone(),
        };
        let report = run_one(ctx, scenario, plan.timeout).await;
        let line = match plan.format {
            Format::Text => report.to_text(),
            Format::Json => report.to_json(),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        all_ok &= report.ok;
    }
    all_ok
}

/// Runs one scenario under `timeout` and reports it.
pub async fn run_one(ctx: Ctx, scenario: Scenario, timeout: Duration) -> Report {
    let progress = Progress::new(expected(&ctx, scenario), ctx.broker_pid);
    let began = Instant::now();
    // On a worker, like every connection task; aborting it drops (and so aborts) them all.
    let mut task = tokio::spawn(start(ctx.clone(), scenario, progress.clone()));
    let outcome = tokio::time::timeout(timeout, &mut task).await;
    progress.end();
    let (timed_out, error, extra) = match outcome {
        Err(_) => {
            task.abort();
            let _ = task.await;
            (true, None, Extra::default())
        }
        Ok(Err(join)) => (
            false,
            Some(format!("scenario task failed: {join}")),
            Extra::default(),
        ),
        Ok(Ok(Err(e))) => (false, Some(format!("{e:#}")), Extra::default()),
        Ok(Ok(Ok(extra))) => (false, None, extra),
    };
    build_report(
        scenario, &ctx, &progress, timed_out, error, extra, began, timeout,
    )
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    scenario: Scenario,
    ctx: &Ctx,
    progress: &Progress,
    timed_out: bool,
    error: Option<String>,
    extra: Extra,
    began: Instant,
    timeout: Duration,
) -> Report {
    let window = progress.window();
    let expected = progress.expected.load(Relaxed);
    let received = progress.received();
    let lost = progress.lost();
    let rate = |unit| {
        let v = if window.throughput_secs > 0.0 {
            received as f64 / window.throughput_secs
        } else {
            0.0
        };
        Figure::new("throughput", Some(v), unit, Better::Higher)
    };
    let mut figures = match scenario {
        Scenario::FaninQos0 | Scenario::FaninQos1 | Scenario::FaninQos2 => vec![rate("msg/s")],
        Scenario::Fanout => vec![rate("deliveries/s")],
        Scenario::Latency => {
            let sorted = progress.sorted_latencies();
            let us = |p: f64| percentile(&sorted, p).map(|ns| ns as f64 / 1000.0);
            vec![
                Figure::new("p50", us(50.0), "us", Better::Lower),
                Figure::new("p99", us(99.0), "us", Better::Lower),
                Figure::new("max", us(100.0), "us", Better::Lower),
            ]
        }
        Scenario::Idle => {
            let mut f = rate("conn/s");
            f.name = "connect_rate";
            vec![f]
        }
        Scenario::Retained => vec![
            Figure::new(
                "all_arrived",
                Some(window.throughput_secs * 1000.0),
                "ms",
                Better::Lower,
            ),
            rate("msg/s"),
        ],
    };
    figures.extend(extra.figures);
    let failure = if timed_out {
        Some(format!(
            "timed out after {} s with {received} of {expected} received",
            timeout.as_secs_f64()
        ))
    } else if let Some(e) = error {
        Some(e)
    } else if scenario.must_not_lose() && lost > 0 {
        Some(match scenario {
            Scenario::Idle => format!("lost {lost} of {expected} idle connections"),
            _ => format!("lost {lost} of {expected} messages that must not be lost"),
        })
    } else {
        None
    };
    Report {
        scenario: scenario.name(),
        ok: failure.is_none(),
        failure,
        timed_out,
        figures,
        expected,
        sent: progress.sent.load(Relaxed),
        received,
        lost,
        must_not_lose: scenario.must_not_lose(),
        duplicates: progress.duplicates.load(Relaxed),
        strays: progress.strays.load(Relaxed),
        wall_secs: window.throughput_secs,
        cpu_window_secs: window.cpu_window_secs,
        cpu_secs: window.generator_cpu_secs,
        broker_cpu_secs: window.broker_cpu_secs,
        total_secs: began.elapsed().as_secs_f64(),
        scale: ctx.scale,
        notes: extra.notes,
    }
}
