//! `stratus bench http`: the HTTP API under load — batched and single-record telemetry
//! ingestion and aggregation queries, the benchmarks of issue #5.
//!
//! A run first registers its devices (`bench-<run>-N`) with the admin credentials; each
//! scenario then fetches the device tokens it needs, opens its keep-alive connections, and
//! only then starts the clock, so argon2 (device registration and token issuance) and TCP
//! handshakes stay out of the figures. Request bodies are rendered from templates whose
//! fixed-width timestamps are rewritten in place ([`body`]). Every answer is checked: 202
//! with the right point count for ingestion (202 means durable), 200 with the expected
//! buckets for the aggregation.

pub mod aggregate;
pub mod body;
pub mod client;
pub mod ingest;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use hyper::Method;

use crate::args::{Format, HttpPlan, HttpScenario, RulesMix};
use crate::progress::{percentile, Progress};
use crate::report::{Better, Figure, HttpReport, Target};
use client::Client;

/// Connections used to register devices and fetch tokens (argon2 on the server: a few at
/// once keep both cores busy).
const SETUP_CONNECTIONS: usize = 4;

/// Latency samples a connection keeps before handing them to the shared counters.
const LATENCY_FLUSH: usize = 1024;

/// A registered bench device.
#[derive(Clone)]
pub struct Device {
    /// Its id, `bench-<run>-N`.
    pub id: String,
    secret: String,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").field("id", &self.id).finish()
    }
}

/// What every scenario of a run shares.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// The server's HTTP listener.
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// Count multiplier.
    pub scale: f64,
    /// The server's PID, for /proc figures.
    pub server_pid: Option<u32>,
    /// The admin secret.
    admin_secret: String,
    /// The devices all ingestion scenarios share (connection `i` posts as device `i`).
    pub devices: Arc<Vec<Device>>,
    /// The device whose one series `aggregate` fills.
    pub aggregate_device: Option<Device>,
}

impl Ctx {
    /// `n × scale`, rounded, at least 1.
    pub fn scaled(&self, n: u64) -> u64 {
        crate::args::scaled(n, self.scale)
    }

    /// Access tokens of the first `n` shared devices (fetched over a few connections).
    pub async fn device_tokens(&self, n: usize) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(
            n <= self.devices.len(),
            "{n} devices needed, {} registered",
            self.devices.len()
        );
        let devices: Vec<Device> = self.devices[..n].to_vec();
        let (addr, host) = (self.addr, self.host.clone());
        let mut tokens = crate::group::bounded(n, SETUP_CONNECTIONS / 2, move |i| {
            let (device, host) = (devices[i].clone(), host.clone());
            async move {
                let mut c = Client::connect(addr).await?;
                let token = client::access_token(&mut c, &host, &device.id, &device.secret).await?;
                Ok((i, token))
            }
        })
        .await?;
        tokens.sort_by_key(|(i, _)| *i);
        Ok(tokens.into_iter().map(|(_, t)| t).collect())
    }

    /// An access token of `device`.
    pub async fn token_of(&self, device: &Device) -> anyhow::Result<String> {
        let mut c = Client::connect(self.addr).await?;
        client::access_token(&mut c, &self.host, &device.id, &device.secret).await
    }

    /// An admin access token.
    pub async fn admin_token(&self) -> anyhow::Result<String> {
        let mut c = Client::connect(self.addr).await?;
        client::access_token(&mut c, &self.host, "admin", &self.admin_secret)
            .await
            .context("the admin token (check --admin-secret / STRATUS_ADMIN_SECRET)")
    }
}

/// Counters of one scenario, readable at any moment (so a timed-out scenario still reports
/// what it got). The measured window, CPU times and latency samples live in [`Progress`].
#[derive(Debug)]
pub struct Meter {
    /// Window, CPU and latency samples (ns).
    pub progress: Arc<Progress>,
    /// Requests the scenario means to send (0 for a timed scenario: the requests sent).
    pub planned: AtomicU64,
    /// Requests sent.
    pub sent: AtomicU64,
    /// Requests answered as expected.
    pub acked: AtomicU64,
    /// Points acknowledged.
    pub points: AtomicU64,
    /// Failed requests.
    pub errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Meter {
    /// New counters; `server_pid` is read for CPU time.
    pub fn new(server_pid: Option<u32>) -> Arc<Meter> {
        Arc::new(Meter {
            progress: Progress::new(0, server_pid),
            planned: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            points: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    /// Counts a request answered as expected, carrying `points` points.
    pub fn ack(&self, points: u64) {
        self.acked.fetch_add(1, Relaxed);
        self.points.fetch_add(points, Relaxed);
        self.progress.mark_received(self.progress.now_ns());
    }

    /// Counts a failed request; the first failure's description is kept.
    pub fn error(&self, what: impl FnOnce() -> String) {
        if self.errors.fetch_add(1, Relaxed) == 0 {
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(what);
            }
        }
    }

    /// The first failure's description.
    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|f| f.clone())
    }
}

/// A connection's latency samples, handed to the [`Progress`] in chunks.
#[derive(Debug)]
pub struct Latencies {
    samples: Vec<u64>,
    progress: Arc<Progress>,
}

impl Latencies {
    /// Samples for `progress`.
    pub fn new(progress: Arc<Progress>) -> Latencies {
        Latencies {
            samples: Vec::with_capacity(LATENCY_FLUSH),
            progress,
        }
    }

    /// Adds one sample.
    pub fn add(&mut self, d: Duration) {
        self.samples.push(d.as_nanos() as u64);
        if self.samples.len() >= LATENCY_FLUSH {
            self.flush();
        }
    }

    /// Hands the samples over.
    pub fn flush(&mut self) {
        if !self.samples.is_empty() {
            self.progress.add_latencies(&self.samples);
            self.samples.clear();
        }
    }
}

impl Drop for Latencies {
    fn drop(&mut self) {
        self.flush();
    }
}

/// What a finished scenario adds to the counters: figures and remarks.
#[derive(Debug, Default)]
pub struct Extra {
    /// Figures that do not come from the counters.
    pub figures: Vec<Figure>,
    /// Remarks for the report.
    pub notes: Vec<String>,
    /// Keep-alive connections of the measured phase.
    pub connections: u32,
}

/// A tag for this run: device ids of other runs are told apart by it.
pub fn run_tag() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    nanos ^ std::process::id().rotate_left(16)
}

/// The server's clock is this machine's: epoch milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Devices the plan's scenarios need: shared ones and whether `aggregate` runs.
fn devices_needed(scenarios: &[HttpScenario]) -> (usize, bool) {
    let shared = scenarios
        .iter()
        .map(|s| match s {
            HttpScenario::IngestBatch => ingest::BATCH_CONNECTIONS,
            HttpScenario::IngestSingle => ingest::SINGLE_CONNECTIONS,
            HttpScenario::Aggregate => 0,
        })
        .max()
        .unwrap_or(0);
    (shared, scenarios.contains(&HttpScenario::Aggregate))
}

/// Registers the run's devices: `bench-<run>-0` … and `bench-<run>-agg`.
pub async fn setup(plan: &HttpPlan, run: u32) -> anyhow::Result<Ctx> {
    let host = plan.addr.to_string();
    let mut ctx = Ctx {
        addr: plan.addr,
        host: host.clone(),
        scale: plan.scale,
        server_pid: plan.server_pid,
        admin_secret: plan.admin_secret.clone(),
        devices: Arc::new(Vec::new()),
        aggregate_device: None,
    };
    let admin = ctx.admin_token().await?;
    let (shared, aggregate) = devices_needed(&plan.scenarios);
    let mut ids: Vec<String> = (0..shared)
        .map(|i| format!("bench-{run:08x}-{i}"))
        .collect();
    if aggregate {
        ids.push(format!("bench-{run:08x}-agg"));
    }
    let ids = Arc::new(ids);
    let addr = plan.addr;
    let all = ids.clone();
    let mut devices = crate::group::bounded(ids.len(), SETUP_CONNECTIONS / 2, move |i| {
        let (ids, admin, host) = (all.clone(), admin.clone(), host.clone());
        async move {
            let mut c = Client::connect(addr).await?;
            let secret = client::register_device(&mut c, &host, &admin, &ids[i]).await?;
            Ok((
                i,
                Device {
                    id: ids[i].clone(),
                    secret,
                },
            ))
        }
    })
    .await?;
    devices.sort_by_key(|(i, _)| *i);
    let mut devices: Vec<Device> = devices.into_iter().map(|(_, d)| d).collect();
    if aggregate {
        ctx.aggregate_device = devices.pop();
    }
    ctx.devices = Arc::new(devices);
    Ok(ctx)
}

/// Registers the devices, then runs every scenario of the plan in turn, printing each
/// report as it ends. Returns the reports (empty when the setup failed, with its error).
pub async fn run_plan(plan: &HttpPlan) -> anyhow::Result<Vec<HttpReport>> {
    let run = run_tag();
    if plan.format == Format::Text {
        println!(
            "stratus bench http → {} (scale {}, timeout {} s per scenario, run {run:08x})",
            plan.base_url,
            plan.scale,
            plan.timeout.as_secs_f64()
        );
    }
    let began = Instant::now();
    let ctx = tokio::time::timeout(plan.timeout, setup(plan, run))
        .await
        .map_err(|_| anyhow::anyhow!("setup timed out after {} s", plan.timeout.as_secs_f64()))?
        .context("setup")?;
    if plan.format == Format::Text {
        println!(
            "setup: {} devices registered in {:.1} s",
            ctx.devices.len() + usize::from(ctx.aggregate_device.is_some()),
            began.elapsed().as_secs_f64()
        );
    }
    let rules = install_rules(&ctx, plan.rules, plan.rules_mix, run).await?;
    if plan.format == Format::Text && !rules.is_empty() {
        println!(
            "rules: {} installed ({}); the bench records reach every one of them",
            rules.len(),
            match plan.rules_mix {
                RulesMix::Never => "never holding",
                RulesMix::Mixed => "mixed",
            }
        );
    }
    let mut reports = Vec::new();
    for (i, &scenario) in plan.scenarios.iter().enumerate() {
        if i > 0 {
            // Let the server finish closing the previous scenario's connections.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let report = run_one(&ctx, scenario, plan.timeout).await;
        let line = match plan.format {
            Format::Text => report.to_text(),
            Format::Json => report.to_json(),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        reports.push(report);
    }
    remove_rules(&ctx, &rules).await;
    Ok(reports)
}

/// Installs `n` rules over the bench series (see `--rules` and `--rules-mix`): the ids
/// installed.
async fn install_rules(ctx: &Ctx, n: u32, mix: RulesMix, run: u32) -> anyhow::Result<Vec<String>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let admin = ctx.admin_token().await?;
    let proto = client::Proto::new(Method::POST, "/api/v1/rules", &ctx.host, Some(&admin), true)?;
    let mut c = Client::connect(ctx.addr).await?;
    let mut ids = Vec::new();
    for i in 0..n {
        let body = bench_rule(i, mix, run);
        let id = body["id"].as_str().unwrap_or_default().to_string();
        let answer = c.send(&proto, Bytes::from(body.to_string())).await?;
        if answer.status != hyper::StatusCode::CREATED {
            anyhow::bail!("POST /api/v1/rules {id}: {}", answer.describe());
        }
        ids.push(id);
    }
    Ok(ids)
}

/// The `i`-th bench rule of a mix. The bench values are `0, 0.25, … 24` (batch, rising by
/// 25/s within a batch) and `21.5` (single).
fn bench_rule(i: u32, mix: RulesMix, run: u32) -> serde_json::Value {
    let id = format!("bench-{run:08x}-rule-{i}");
    let glob = format!("bench-{run:08x}-*");
    match mix {
        RulesMix::Never => {
            let condition = if i.is_multiple_of(2) {
                format!(
                    "batch > {} || single > {}",
                    1e12 + f64::from(i),
                    1e12 + f64::from(i)
                )
            } else {
                "rate(batch) > 1e12 || rate(single) > 1e12".to_string()
            };
            serde_json::json!({"id": id, "condition": condition, "selector": {"id_glob": glob}})
        }
        RulesMix::Mixed => {
            // Thresholds spread over the bench values, no two rules alike.
            let t = f64::from(i * 7 % 25) + f64::from(i / 50) / 2.0;
            let (condition, selector) = match i % 10 {
                0 | 1 => (format!("batch > {t}"), serde_json::json!({"id_glob": glob})),
                2 | 3 => (
                    format!("batch < {t} && rate(batch) > 0"),
                    serde_json::json!({"id_glob": glob}),
                ),
                4 | 5 => (
                    format!("(batch >= {t} && batch <= {}) || single > 30", t + 2.0),
                    serde_json::json!({"id_glob": glob}),
                ),
                6 => (
                    format!("!(batch < {t}) && rate(batch) < 100"),
                    serde_json::json!({"id_glob": glob}),
                ),
                7 => (
                    format!("batch == {t} || single == {t}"),
                    serde_json::json!({"id_glob": glob}),
                ),
                8 => (
                    format!("single >= 21.5 && batch > {t}"),
                    serde_json::json!({"id_glob": glob}),
                ),
                _ => (
                    format!("batch > {t}"),
                    serde_json::json!({"id_glob": glob, "attributes": {"site": "elsewhere"}}),
                ),
            };
            serde_json::json!({
                "id": id, "condition": condition, "selector": selector, "for_s": 3600
            })
        }
    }
}

/// Deletes the rules `install_rules` made (failures are only reported).
async fn remove_rules(ctx: &Ctx, ids: &[String]) {
    if ids.is_empty() {
        return;
    }
    let result: anyhow::Result<()> = async {
        let admin = ctx.admin_token().await?;
        let mut c = Client::connect(ctx.addr).await?;
        for id in ids {
            let path = format!("/api/v1/rules/{id}");
            let proto = client::Proto::new(Method::DELETE, &path, &ctx.host, Some(&admin), false)?;
            c.send(&proto, Bytes::new()).await?;
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("the bench rules were not all deleted: {e:#}");
    }
}

/// Runs one scenario under `timeout` and reports it.
pub async fn run_one(ctx: &Ctx, scenario: HttpScenario, timeout: Duration) -> HttpReport {
    let meter = Meter::new(ctx.server_pid);
    let loadavg_before = crate::procfs::loadavg();
    let began = Instant::now();
    let fut: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<Extra>> + Send>> =
        match scenario {
            HttpScenario::IngestBatch => Box::pin(ingest::batch(ctx.clone(), meter.clone())),
            HttpScenario::IngestSingle => Box::pin(ingest::single(ctx.clone(), meter.clone())),
            HttpScenario::Aggregate => Box::pin(aggregate::run(ctx.clone(), meter.clone())),
        };
    // On a worker, like the connections; aborting it drops (and so aborts) them all.
    let mut task = tokio::spawn(fut);
    let outcome = tokio::time::timeout(timeout, &mut task).await;
    meter.progress.end();
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
    let parts = Outcome {
        timed_out,
        error,
        extra,
        began,
        timeout,
        loadavg_before,
    };
    build_report(scenario, ctx, &meter, parts)
}

struct Outcome {
    timed_out: bool,
    error: Option<String>,
    extra: Extra,
    began: Instant,
    timeout: Duration,
    loadavg_before: Option<[f64; 3]>,
}

/// Milliseconds at percentile `p` of sorted nanosecond samples.
fn ms_at(sorted: &[u64], p: f64) -> Option<f64> {
    percentile(sorted, p).map(|ns| ns as f64 / 1e6)
}

fn build_report(scenario: HttpScenario, ctx: &Ctx, meter: &Meter, o: Outcome) -> HttpReport {
    let window = meter.progress.window();
    let sent = meter.sent.load(Relaxed);
    let acked = meter.acked.load(Relaxed);
    let points = meter.points.load(Relaxed);
    let errors = meter.errors.load(Relaxed);
    let planned = match meter.planned.load(Relaxed) {
        0 => sent,
        n => n,
    };
    let rate = |n: u64, unit| {
        let v = (window.throughput_secs > 0.0).then(|| n as f64 / window.throughput_secs);
        Figure::new("throughput", v, unit, Better::Higher)
    };
    let sorted = meter.progress.sorted_latencies();
    let latency = |name, p| Figure::new(name, ms_at(&sorted, p), "ms", Better::Lower);
    let mut figures = match scenario {
        HttpScenario::IngestBatch => vec![
            rate(points, "points/s"),
            latency("p50", 50.0),
            latency("p99", 99.0),
            latency("max", 100.0),
        ],
        HttpScenario::IngestSingle => vec![
            rate(acked, "requests/s"),
            latency("p50", 50.0),
            latency("p99", 99.0),
            latency("max", 100.0),
        ],
        HttpScenario::Aggregate => Vec::new(),
    };
    figures.extend(o.extra.figures);
    let targets = match scenario {
        HttpScenario::IngestBatch => vec![Target::check(
            &figures,
            "throughput",
            ingest::BATCH_TARGET,
            Better::Higher,
        )],
        HttpScenario::IngestSingle => vec![Target::check(
            &figures,
            "throughput",
            ingest::SINGLE_TARGET,
            Better::Higher,
        )],
        HttpScenario::Aggregate => vec![Target::check(
            &figures,
            "median",
            aggregate::TARGET_MS,
            Better::Lower,
        )],
    };
    let failure = if o.timed_out {
        Some(format!(
            "timed out after {} s with {acked} of {planned} requests acknowledged",
            o.timeout.as_secs_f64()
        ))
    } else if errors > 0 {
        Some(format!(
            "{errors} of {sent} requests failed; the first: {}",
            meter.first_error().unwrap_or_default()
        ))
    } else if let Some(e) = o.error {
        Some(e)
    } else if acked < planned {
        Some(format!(
            "only {acked} of {planned} requests were acknowledged"
        ))
    } else {
        None
    };
    HttpReport {
        scenario: scenario.name(),
        ok: failure.is_none(),
        failure,
        timed_out: o.timed_out,
        figures,
        targets,
        connections: o.extra.connections,
        requests: planned,
        sent,
        acknowledged: acked,
        errors,
        points,
        wall_secs: window.throughput_secs,
        cpu_window_secs: window.cpu_window_secs,
        cpu_secs: window.generator_cpu_secs,
        server_cpu_secs: window.broker_cpu_secs,
        total_secs: o.began.elapsed().as_secs_f64(),
        loadavg_before: o.loadavg_before,
        loadavg_after: crate::procfs::loadavg(),
        scale: ctx.scale,
        notes: o.extra.notes,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_bench_rules_of_each_mix() {
        let never = bench_rule(3, RulesMix::Never, 0xab);
        assert_eq!(never["id"], "bench-000000ab-rule-3");
        assert_eq!(
            never["condition"],
            "rate(batch) > 1e12 || rate(single) > 1e12"
        );
        assert_eq!(never["selector"]["id_glob"], "bench-000000ab-*");
        let mixed: Vec<serde_json::Value> = (0..100)
            .map(|i| bench_rule(i, RulesMix::Mixed, 1))
            .collect();
        let conditions: std::collections::HashSet<&str> = mixed
            .iter()
            .map(|r| r["condition"].as_str().unwrap())
            .collect();
        assert!(
            conditions.len() > 80,
            "mostly distinct: {}",
            conditions.len()
        );
        assert!(mixed.iter().all(|r| r["for_s"] == 3600));
        let elsewhere = mixed
            .iter()
            .filter(|r| r["selector"].get("attributes").is_some())
            .count();
        assert_eq!(elsewhere, 10);
        assert!(conditions.iter().any(|c| c.contains("rate(batch)")));
        assert!(conditions.iter().any(|c| c.starts_with('!')));
    }

    use super::*;

    #[test]
    fn devices_cover_the_widest_scenario() {
        assert_eq!(devices_needed(&HttpScenario::ALL), (64, true));
        assert_eq!(devices_needed(&[HttpScenario::IngestBatch]), (8, false));
        assert_eq!(devices_needed(&[HttpScenario::Aggregate]), (0, true));
    }

    #[test]
    fn the_first_error_is_kept() {
        let m = Meter::new(None);
        m.error(|| "first".into());
        m.error(|| "second".into());
        assert_eq!(m.errors.load(Relaxed), 2);
        assert_eq!(m.first_error().as_deref(), Some("first"));
        m.ack(1000);
        assert_eq!(m.points.load(Relaxed), 1000);
    }

    #[test]
    fn percentiles_are_reported_in_milliseconds() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1_000_000).collect();
        assert_eq!(ms_at(&ns, 50.0), Some(50.0));
        assert_eq!(ms_at(&ns, 99.0), Some(99.0));
        assert_eq!(ms_at(&[], 50.0), None);
    }
}
