//! Command-line arguments of `stratus bench` and their validation into a [`Plan`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(UsageError(format!(
                "--scale must be a positive number, got {}",
                self.scale
            )));
        }
        if !(self.timeout.is_finite() && self.timeout > 0.0 && self.timeout <= 86_400.0) {
            return Err(UsageError(format!(
                "--timeout must be between 0 and 86400 seconds, got {}",
                self.timeout
            )));
        }
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
}
