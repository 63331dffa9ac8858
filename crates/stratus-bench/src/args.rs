//! Command-line arguments of `stratus bench` and their validation into a [`Plan`] (MQTT), an
//! [`HttpPlan`] (HTTP) or a [`CoapPlan`] (CoAP).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};

/// `stratus bench`: load generators for the servers Stratus is measured against.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to load.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The protocols `stratus bench` can load.
#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// Load an MQTT 3.1.1 broker on this machine (Stratus, Mosquitto, rumqttd, …) and report
    /// throughput, latency, losses and the generator's own CPU time.
    ///
    /// Scenarios: fanin-qos0, fanin-qos1, fanin-qos2 (publishers → one `t/#` subscriber),
    /// fanout (1 → 100 subscribers), latency (2,000 msg/s for 10 s), idle (10,000 idle
    /// connections), retained (10,000 retained messages, then one `r/#` subscriber).
    /// Exit code 1 when a scenario lost QoS 1/2 or retained messages, lost idle connections,
    /// failed or timed out.
    Mqtt(MqttArgs),
    /// Load the HTTP API of a Stratus server on this machine: batched and single-record
    /// telemetry ingestion and aggregation queries (the benchmarks of issue #5).
    ///
    /// Scenarios: ingest-batch (8 keep-alive connections POSTing batches of 1,000 records,
    /// 5,000,000 points), ingest-single (64 keep-alive connections POSTing one record per
    /// request, closed loop, for 10 s), aggregate (10,000,000 points of one series loaded in
    /// batches of 10,000, then `agg=avg&interval=1m` over all of them, 5 times). Each scenario
    /// reports its figures next to the target. Registers devices `bench-<run>-N` with
    /// the admin credentials and leaves them and their telemetry behind: use a scratch data dir.
    /// Exit code 1 when a request failed, a check of the answers failed or a scenario timed
    /// out (a missed target alone is not a failure).
    Http(HttpArgs),
    /// Load the CoAP listener of a Stratus server on this machine: 64 clients (UDP sockets)
    /// send confirmable `POST /telemetry?token=…` requests in a closed loop for 10 s
    /// (issue #6: at least 40,000 requests/s), reporting requests/s, p50/p99/max latency,
    /// errors and timeouts.
    ///
    /// Registers one device `bench-<run>-coap` with the admin credentials over HTTP (`--server`)
    /// and leaves it and its telemetry behind: use a scratch data dir. Exit code 1 when a
    /// request failed or timed out, or the run timed out (a missed target alone is not a
    /// failure).
    Coap(CoapArgs),
}

/// Arguments of `stratus bench mqtt`.
#[derive(Args, Debug, Clone)]
pub struct MqttArgs {
    /// Broker address; only loopback is accepted (127.0.0.0/8, ::1 or localhost).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker MQTT port.
    #[arg(long, default_value_t = 1883)]
    pub port: u16,
    /// Scenario to run, or `all` (in the order listed).
    #[arg(long, value_enum, default_value_t = ScenarioArg::All)]
    pub scenario: ScenarioArg,
    /// Multiplies message and idle-connection counts (0.01 is the CI smoke size); no count
    /// goes below 1. Publisher and subscriber counts stay as the scenario defines them.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// PID of the broker process: its RSS (idle) and CPU time are read from /proc.
    #[arg(long, value_name = "PID")]
    pub broker_pid: Option<u32>,
    /// Output format: human-readable text, or one JSON object per scenario per line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Time limit per scenario in seconds; a scenario that does not finish in time reports
    /// what it got and fails.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub timeout: f64,
    /// Writes the latency scenario's samples to FILE, one per line in arrival order (µs), to
    /// look at the tail behind a p99: when in the run the slow messages came, and how slow.
    #[arg(long, value_name = "FILE")]
    pub latency_samples: Option<PathBuf>,
}

/// A scenario name on the command line.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScenarioArg {
    /// Every scenario, in order.
    All,
    /// 16 publishers × 62,500 QoS 0 messages → one `t/#` subscriber.
    FaninQos0,
    /// The same at QoS 1, 64 in flight per publisher, QoS 1 subscription.
    FaninQos1,
    /// 4 publishers at QoS 2, 64 in flight each, QoS 2 subscription.
    FaninQos2,
    /// 1 publisher → 100 subscribers on one topic, 10,000 QoS 0 messages.
    Fanout,
    /// 2,000 msg/s for 10 s, 1 publisher → 1 subscriber: p50/p99/max latency.
    Latency,
    /// 10,000 idle connections: connect rate and broker RSS per connection.
    Idle,
    /// 10,000 retained messages, then a fresh `r/#` subscriber: time until all arrived.
    Retained,
}

/// One scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// See [`ScenarioArg::FaninQos0`].
    FaninQos0,
    /// See [`ScenarioArg::FaninQos1`].
    FaninQos1,
    /// See [`ScenarioArg::FaninQos2`].
    FaninQos2,
    /// See [`ScenarioArg::Fanout`].
    Fanout,
    /// See [`ScenarioArg::Latency`].
    Latency,
    /// See [`ScenarioArg::Idle`].
    Idle,
    /// See [`ScenarioArg::Retained`].
    Retained,
}

impl Scenario {
    /// Every scenario in the order `all` runs them.
    pub const ALL: [Scenario; 7] = [
        Scenario::FaninQos0,
        Scenario::FaninQos1,
        Scenario::FaninQos2,
        Scenario::Fanout,
        Scenario::Latency,
        Scenario::Idle,
        Scenario::Retained,
    ];

    /// The scenario's name as on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::FaninQos0 => "fanin-qos0",
            Scenario::FaninQos1 => "fanin-qos1",
            Scenario::FaninQos2 => "fanin-qos2",
            Scenario::Fanout => "fanout",
            Scenario::Latency => "latency",
            Scenario::Idle => "idle",
            Scenario::Retained => "retained",
        }
    }

    /// Whether a lost message (or idle connection) fails the scenario.
    pub fn must_not_lose(self) -> bool {
        matches!(
            self,
            Scenario::FaninQos1 | Scenario::FaninQos2 | Scenario::Retained | Scenario::Idle
        )
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Output format.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One line per scenario for people.
    Text,
    /// One JSON object per scenario, one per line.
    Json,
}

/// Validated arguments: what to run, where, how big and for how long.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The broker.
    pub addr: SocketAddr,
    /// Scenarios in order.
    pub scenarios: Vec<Scenario>,
    /// Count multiplier.
    pub scale: f64,
    /// Broker PID for /proc figures.
    pub broker_pid: Option<u32>,
    /// Output format.
    pub format: Format,
    /// Per-scenario time limit.
    pub timeout: Duration,
    /// Where the latency scenario writes its samples (`--latency-samples`).
    pub latency_samples: Option<PathBuf>,
}

impl Plan {
    /// `n × scale`, rounded, never below 1.
    pub fn scaled(&self, n: u64) -> u64 {
        scaled(n, self.scale)
    }
}

/// `n × scale`, rounded, never below 1.
pub fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale).round() as u64).max(1)
}

/// Arguments of `stratus bench http`.
#[derive(Args, Debug, Clone)]
pub struct HttpArgs {
    /// The server's base URL; only `http://` on loopback is accepted (127.0.0.0/8, ::1 or
    /// localhost).
    #[arg(long, value_name = "URL", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Scenario to run, or `all` (in the order listed).
    #[arg(long, value_enum, default_value_t = HttpScenarioArg::All)]
    pub scenario: HttpScenarioArg,
    /// The admin secret (used to register the bench devices).
    #[arg(
        long,
        value_name = "SECRET",
        env = "STRATUS_ADMIN_SECRET",
        hide_env_values = true
    )]
    pub admin_secret: Option<String>,
    /// File holding the admin secret, read when neither --admin-secret nor
    /// STRATUS_ADMIN_SECRET is given.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_ADMIN_SECRET_FILE)]
    pub admin_secret_file: PathBuf,
    /// Multiplies point counts and the single-record duration (0.01 is the CI smoke size);
    /// no count goes below 1 and no duration below 1 s. Connection counts and batch sizes stay
    /// as the scenario defines them.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// PID of the server process: its CPU time is read from /proc.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Output format: human-readable text, or one JSON object per scenario per line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Time limit per scenario in seconds (setup and loading included); a scenario that does
    /// not finish in time reports what it got and fails.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub timeout: f64,
    /// Installs N rules before the scenarios (and deletes them after) that every bench record
    /// is evaluated against (thresholds and `rate()` of the bench series, selected by a glob
    /// on the bench devices, never firing): run with and without to see what rules cost.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub rules: u32,
    /// Which rules `--rules` installs: `never` (thresholds far above the bench values and
    /// `rate()` joined by `||`: no rule ever holds) or `mixed` (thresholds inside the bench
    /// values, `&&`/`||`/`!` combinations, `rate()`, `==`, `for_s` of an hour so rules hold
    /// and stop holding without firing, and a tenth selecting by attributes no bench device
    /// has).
    #[arg(long, value_enum, default_value_t = RulesMix::Never)]
    pub rules_mix: RulesMix,
}

/// The rules `stratus bench http --rules N` installs.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesMix {
    /// Rules that never hold for the bench records.
    Never,
    /// Rules that hold for part of the records.
    Mixed,
}

/// Arguments of `stratus bench coap`.
#[derive(Args, Debug, Clone)]
pub struct CoapArgs {
    /// The server's HTTP base URL, used to register the device and get its access token; only
    /// `http://` on loopback is accepted.
    #[arg(long, value_name = "URL", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// The CoAP listener: `coap://HOST:PORT` on loopback (default: the host of --server, port
    /// 5683).
    #[arg(long, value_name = "URL")]
    pub coap: Option<String>,
    /// The admin secret (used to register the bench device).
    #[arg(
        long,
        value_name = "SECRET",
        env = "STRATUS_ADMIN_SECRET",
        hide_env_values = true
    )]
    pub admin_secret: Option<String>,
    /// File holding the admin secret, read when neither --admin-secret nor
    /// STRATUS_ADMIN_SECRET is given.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_ADMIN_SECRET_FILE)]
    pub admin_secret_file: PathBuf,
    /// Multiplies the duration of the closed loop (10 s at 1; 0.01 is the CI smoke size); it
    /// never goes below 1 s. The client count stays 64.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// PID of the server process: its CPU time is read from /proc.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Output format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Time limit of the run in seconds (setup included); a run that does not finish in time
    /// reports what it got and fails.
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub timeout: f64,
}

/// Validated arguments of `stratus bench coap`.
#[derive(Clone)]
pub struct CoapPlan {
    /// The server's HTTP listener (registration, tokens).
    pub http_addr: SocketAddr,
    /// The base URL as given (for reports), without a trailing slash.
    pub base_url: String,
    /// The server's CoAP listener.
    pub coap_addr: SocketAddr,
    /// The admin secret.
    pub admin_secret: String,
    /// Duration multiplier.
    pub scale: f64,
    /// Server PID for /proc figures.
    pub server_pid: Option<u32>,
    /// Output format.
    pub format: Format,
    /// Time limit of the run.
    pub timeout: Duration,
}

impl fmt::Debug for CoapPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoapPlan")
            .field("http_addr", &self.http_addr)
            .field("coap_addr", &self.coap_addr)
            .field("admin_secret", &"<redacted>")
            .field("scale", &self.scale)
            .field("server_pid", &self.server_pid)
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl CoapArgs {
    /// Validates the arguments and finds the admin secret.
    pub fn plan(&self) -> Result<CoapPlan, UsageError> {
        let http_addr = loopback_http_url(&self.server)?;
        check_scale_and_timeout(self.scale, self.timeout)?;
        let coap_addr = match &self.coap {
            Some(url) => loopback_coap_url(url)?,
            None => SocketAddr::new(http_addr.ip(), 5683),
        };
        let admin_secret = admin_secret(self.admin_secret.as_deref(), &self.admin_secret_file)?;
        Ok(CoapPlan {
            http_addr,
            base_url: self.server.trim_end_matches('/').to_string(),
            coap_addr,
            admin_secret,
            scale: self.scale,
            server_pid: self.server_pid,
            format: self.format,
            timeout: Duration::from_secs_f64(self.timeout),
        })
    }
}

/// The socket address of a `coap://HOST[:PORT][/]` URL whose host is loopback (port 5683 when
/// none is given).
pub fn loopback_coap_url(url: &str) -> Result<SocketAddr, UsageError> {
    let bad = |why: &str| UsageError(format!("--coap {url:?}: {why}"));
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("coap") => rest,
        Some((scheme, _)) => {
            return Err(bad(&format!("only coap:// is supported, not {scheme}://")))
        }
        None => return Err(bad("expected coap://HOST:PORT")),
    };
    // The same authority rules as http://, with CoAP's default port.
    let as_http = format!("http://{rest}");
    let has_port = match rest.rfind(']') {
        Some(end) => rest[end..].contains(':'),
        None => rest.trim_end_matches('/').contains(':'),
    };
    let addr = loopback_http_url(&as_http).map_err(|e| bad(&e.0))?;
    Ok(if has_port {
        addr
    } else {
        SocketAddr::new(addr.ip(), 5683)
    })
}

/// The server `stratus bench http` loads when `--server` is not given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Where `stratus serve` writes a generated admin secret with the default data dir.
pub const DEFAULT_ADMIN_SECRET_FILE: &str = "./stratus-data/admin-secret";

/// An HTTP scenario name on the command line.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpScenarioArg {
    /// Every scenario, in order.
    All,
    /// 8 connections × 625 batches of 1,000 records → points/s acknowledged (202).
    IngestBatch,
    /// 64 connections, one record per request, closed loop for 10 s → requests/s.
    IngestSingle,
    /// 10,000,000 points of one series, then avg per 1-minute bucket over all of them.
    Aggregate,
}

/// One HTTP scenario to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpScenario {
    /// See [`HttpScenarioArg::IngestBatch`].
    IngestBatch,
    /// See [`HttpScenarioArg::IngestSingle`].
    IngestSingle,
    /// See [`HttpScenarioArg::Aggregate`].
    Aggregate,
}

impl HttpScenario {
    /// Every scenario in the order `all` runs them.
    pub const ALL: [HttpScenario; 3] = [
        HttpScenario::IngestBatch,
        HttpScenario::IngestSingle,
        HttpScenario::Aggregate,
    ];

    /// The scenario's name as on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            HttpScenario::IngestBatch => "ingest-batch",
            HttpScenario::IngestSingle => "ingest-single",
            HttpScenario::Aggregate => "aggregate",
        }
    }
}

impl fmt::Display for HttpScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Validated arguments of `stratus bench http`.
#[derive(Clone)]
pub struct HttpPlan {
    /// The server's HTTP listener.
    pub addr: SocketAddr,
    /// The base URL as given (for reports), without a trailing slash.
    pub base_url: String,
    /// Scenarios in order.
    pub scenarios: Vec<HttpScenario>,
    /// The admin secret.
    pub admin_secret: String,
    /// Count multiplier.
    pub scale: f64,
    /// Server PID for /proc figures.
    pub server_pid: Option<u32>,
    /// Output format.
    pub format: Format,
    /// Per-scenario time limit.
    pub timeout: Duration,
    /// Rules to install for the run.
    pub rules: u32,
    /// Which rules.
    pub rules_mix: RulesMix,
}

impl fmt::Debug for HttpPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpPlan")
            .field("addr", &self.addr)
            .field("scenarios", &self.scenarios)
            .field("admin_secret", &"<redacted>")
            .field("scale", &self.scale)
            .field("server_pid", &self.server_pid)
            .field("format", &self.format)
            .field("timeout", &self.timeout)
            .field("rules", &self.rules)
            .field("rules_mix", &self.rules_mix)
            .finish()
    }
}

impl HttpArgs {
    /// Validates the arguments and finds the admin secret.
    pub fn plan(&self) -> Result<HttpPlan, UsageError> {
        let addr = loopback_http_url(&self.server)?;
        check_scale_and_timeout(self.scale, self.timeout)?;
        let admin_secret = admin_secret(self.admin_secret.as_deref(), &self.admin_secret_file)?;
        let scenarios = match self.scenario {
            HttpScenarioArg::All => HttpScenario::ALL.to_vec(),
            HttpScenarioArg::IngestBatch => vec![HttpScenario::IngestBatch],
            HttpScenarioArg::IngestSingle => vec![HttpScenario::IngestSingle],
            HttpScenarioArg::Aggregate => vec![HttpScenario::Aggregate],
        };
        Ok(HttpPlan {
            addr,
            base_url: self.server.trim_end_matches('/').to_string(),
            scenarios,
            admin_secret,
            scale: self.scale,
            server_pid: self.server_pid,
            format: self.format,
            timeout: Duration::from_secs_f64(self.timeout),
            rules: self.rules,
            rules_mix: self.rules_mix,
        })
    }
}

/// The admin secret: `--admin-secret` (or its environment variable) when set and not blank,
/// otherwise the first line of the secret file.
fn admin_secret(given: Option<&str>, file: &std::path::Path) -> Result<String, UsageError> {
    match given.map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => read_secret_file(file),
    }
}

fn read_secret_file(path: &std::path::Path) -> Result<String, UsageError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        UsageError(format!(
            "no admin secret: --admin-secret and STRATUS_ADMIN_SECRET are not set and {} \
             cannot be read ({e}); pass --admin-secret-file",
            path.display()
        ))
    })?;
    let secret = text.lines().next().unwrap_or("").trim();
    if secret.is_empty() {
        return Err(UsageError(format!(
            "admin secret file {} is empty",
            path.display()
        )));
    }
    Ok(secret.to_string())
}

fn check_scale_and_timeout(scale: f64, timeout: f64) -> Result<(), UsageError> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(UsageError(format!(
            "--scale must be a positive number, got {scale}"
        )));
    }
    if !(timeout.is_finite() && timeout > 0.0 && timeout <= 86_400.0) {
        return Err(UsageError(format!(
            "--timeout must be between 0 and 86400 seconds, got {timeout}"
        )));
    }
    Ok(())
}

/// The socket address of an `http://HOST[:PORT][/]` URL whose host is loopback (port 80 when
/// none is given). Anything else — another scheme, a path, a remote host — is refused.
pub fn loopback_http_url(url: &str) -> Result<SocketAddr, UsageError> {
    let bad = |why: &str| UsageError(format!("--server {url:?}: {why}"));
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(bad(&format!(
                "only http:// is supported, not {scheme}:// (the generator targets this machine)"
            )))
        }
        None => return Err(bad("expected http://HOST:PORT")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(bad("expected http://HOST:PORT without a path"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
    };
    let ip = loopback_host(host).map_err(|_| {
        bad(
            "the host is not a loopback address (127.0.0.0/8, ::1 or localhost): the load \
             generator only targets this machine",
        )
    })?;
    Ok(SocketAddr::new(ip, port))
}

/// A usage error, reported with exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl MqttArgs {
    /// Validates the arguments.
    pub fn plan(&self) -> Result<Plan, UsageError> {
        let ip = loopback_host(&self.host)?;
        check_scale_and_timeout(self.scale, self.timeout)?;
        if self.port == 0 {
            return Err(UsageError("--port must not be 0".into()));
        }
        let scenarios = match self.scenario {
            ScenarioArg::All => Scenario::ALL.to_vec(),
            ScenarioArg::FaninQos0 => vec![Scenario::FaninQos0],
            ScenarioArg::FaninQos1 => vec![Scenario::FaninQos1],
            ScenarioArg::FaninQos2 => vec![Scenario::FaninQos2],
            ScenarioArg::Fanout => vec![Scenario::Fanout],
            ScenarioArg::Latency => vec![Scenario::Latency],
            ScenarioArg::Idle => vec![Scenario::Idle],
            ScenarioArg::Retained => vec![Scenario::Retained],
        };
        Ok(Plan {
            addr: SocketAddr::new(ip, self.port),
            scenarios,
            scale: self.scale,
            broker_pid: self.broker_pid,
            format: self.format,
            timeout: Duration::from_secs_f64(self.timeout),
            latency_samples: self.latency_samples.clone(),
        })
    }
}

/// Resolves `host` without DNS and refuses anything but loopback: this generator must never
/// send load to another machine.
pub fn loopback_host(host: &str) -> Result<IpAddr, UsageError> {
    let refuse = || {
        UsageError(format!(
            "--host {host} is not a loopback address (127.0.0.0/8, ::1 or localhost): \
             the load generator only targets this machine"
        ))
    };
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip: IpAddr = bare.parse().map_err(|_| refuse())?;
    let ok = match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    };
    if ok {
        Ok(ip)
    } else {
        Err(refuse())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_are_accepted() {
        for ok in [
            "127.0.0.1",
            "127.1.2.3",
            "localhost",
            "LOCALHOST",
            "::1",
            "[::1]",
        ] {
            assert!(loopback_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "192.168.1.1",
            "0.0.0.0",
            "8.8.8.8",
            "::",
            "::ffff:127.0.0.1",
            "example.com",
            "localhost.example.com",
            "",
        ] {
            assert!(loopback_host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scale_never_goes_below_one() {
        assert_eq!(scaled(62_500, 1.0), 62_500);
        assert_eq!(scaled(62_500, 0.01), 625);
        assert_eq!(scaled(10, 0.01), 1);
        assert_eq!(scaled(1, 1e-9), 1);
        assert_eq!(scaled(10_000, 2.5), 25_000);
    }

    fn args() -> MqttArgs {
        MqttArgs {
            host: "127.0.0.1".into(),
            port: 1883,
            scenario: ScenarioArg::All,
            scale: 1.0,
            broker_pid: None,
            format: Format::Text,
            timeout: 60.0,
            latency_samples: None,
        }
    }

    #[test]
    fn bad_numbers_are_usage_errors() {
        let mut a = args();
        a.scale = 0.0;
        assert!(a.plan().is_err());
        a.scale = f64::NAN;
        assert!(a.plan().is_err());
        let mut a = args();
        a.timeout = -1.0;
        assert!(a.plan().is_err());
        let mut a = args();
        a.port = 0;
        assert!(a.plan().is_err());
        let plan = args().plan().unwrap();
        assert_eq!(plan.scenarios.len(), 7);
    }

    #[test]
    fn coap_urls_must_be_coap_on_loopback() {
        let ok = |u: &str| loopback_coap_url(u).unwrap().to_string();
        assert_eq!(ok("coap://127.0.0.1:5683"), "127.0.0.1:5683");
        assert_eq!(ok("coap://127.0.0.1"), "127.0.0.1:5683");
        assert_eq!(ok("coap://[::1]:9000/"), "[::1]:9000");
        assert_eq!(ok("coap://localhost"), "127.0.0.1:5683");
        for bad in [
            "coaps://127.0.0.1:5684",
            "http://127.0.0.1:5683",
            "coap://10.0.0.1:5683",
            "coap://127.0.0.1:0",
            "coap://127.0.0.1/telemetry",
            "127.0.0.1:5683",
        ] {
            assert!(loopback_coap_url(bad).is_err(), "{bad}");
        }
        let a = CoapArgs {
            server: "http://127.0.0.1:8080".into(),
            coap: None,
            admin_secret: Some("s".into()),
            admin_secret_file: PathBuf::from("/nonexistent"),
            scale: 1.0,
            server_pid: None,
            format: Format::Text,
            timeout: 60.0,
        };
        let plan = a.plan().unwrap();
        assert_eq!(plan.coap_addr.to_string(), "127.0.0.1:5683");
        assert!(!format!("{plan:?}").contains("\"s\""));
        let mut b = a.clone();
        b.scale = 0.0;
        assert!(b.plan().is_err());
        b = a.clone();
        b.coap = Some("coap://192.168.0.1".into());
        assert!(b.plan().is_err());
    }

    #[test]
    fn server_urls_must_be_plain_http_on_loopback() {
        let ok = |u: &str| loopback_http_url(u).unwrap().to_string();
        assert_eq!(ok("http://127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(ok("http://127.0.0.1:8080/"), "127.0.0.1:8080");
        assert_eq!(ok("HTTP://localhost:9"), "127.0.0.1:9");
        assert_eq!(ok("http://[::1]:8080"), "[::1]:8080");
        assert_eq!(ok("http://127.0.0.1"), "127.0.0.1:80");
        for bad in [
            "https://127.0.0.1:8443",
            "127.0.0.1:8080",
            "http://10.0.0.1:8080",
            "http://example.com:8080",
            "http://127.0.0.1:0",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:8080/api",
            "http://user@127.0.0.1:8080",
            "http://[::1:8080",
            "http://",
        ] {
            assert!(loopback_http_url(bad).is_err(), "{bad}");
        }
    }

    fn http_args() -> HttpArgs {
        HttpArgs {
            server: DEFAULT_SERVER.into(),
            scenario: HttpScenarioArg::All,
            admin_secret: Some("s3cret".into()),
            admin_secret_file: PathBuf::from("/nonexistent/admin-secret"),
            scale: 1.0,
            server_pid: None,
            format: Format::Text,
            timeout: 60.0,
            rules: 0,
            rules_mix: RulesMix::Never,
        }
    }

    #[test]
    fn the_admin_secret_comes_from_the_flag_or_the_file() {
        let plan = http_args().plan().unwrap();
        assert_eq!(plan.admin_secret, "s3cret");
        assert_eq!(plan.scenarios, HttpScenario::ALL);
        assert!(!format!("{plan:?}").contains("s3cret"));

        let mut a = http_args();
        a.admin_secret = None;
        assert!(a
            .plan()
            .unwrap_err()
            .0
            .contains("/nonexistent/admin-secret"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("admin-secret");
        std::fs::write(&file, "from-file\n").unwrap();
        a.admin_secret_file = file.clone();
        assert_eq!(a.plan().unwrap().admin_secret, "from-file");
        a.admin_secret = Some("  ".into());
        assert_eq!(a.plan().unwrap().admin_secret, "from-file");
        std::fs::write(&file, "\n").unwrap();
        assert!(a.plan().unwrap_err().0.contains("empty"));

        let mut a = http_args();
        a.scale = -1.0;
        assert!(a.plan().is_err());
        a.scale = 0.5;
        a.scenario = HttpScenarioArg::Aggregate;
        assert_eq!(a.plan().unwrap().scenarios, [HttpScenario::Aggregate]);
    }
}
