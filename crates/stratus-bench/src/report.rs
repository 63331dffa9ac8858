//! A scenario's result — figures with units, losses (MQTT) or errors (HTTP), times, CPU — as
//! text or one JSON line.

use serde::Serialize;

/// Shortest CPU window whose CPU share the text report shows (/proc's tick is 10 ms).
pub const MIN_SHARE_WINDOW_SECS: f64 = 0.5;

/// Which direction of a figure is better (for the comparison table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// More is better (rates).
    Higher,
    /// Less is better (latency, memory, time).
    Lower,
}

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// Name, e.g. `throughput`, `p99`.
    pub name: &'static str,
    /// Value, `None` when it could not be measured (e.g. RSS without `--broker-pid`).
    pub value: Option<f64>,
    /// Unit, e.g. `msg/s`, `us`, `KiB/conn`.
    pub unit: &'static str,
    /// Which direction is better.
    pub better: Better,
}

impl Figure {
    /// A figure.
    pub fn new(name: &'static str, value: Option<f64>, unit: &'static str, better: Better) -> Self {
        Figure {
            name,
            value,
            unit,
            better,
        }
    }
}

/// The result of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: &'static str,
    /// False when it lost what it must not lose, timed out or failed.
    pub ok: bool,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// Whether `--timeout` ended it.
    pub timed_out: bool,
    /// The figures.
    pub figures: Vec<Figure>,
    /// Messages (idle: connections) expected to arrive.
    pub expected: u64,
    /// Messages written by publishers.
    pub sent: u64,
    /// Distinct expected messages that arrived (idle: connections acknowledged).
    pub received: u64,
    /// Expected messages that did not arrive (idle: connections refused or closed).
    pub lost: u64,
    /// Whether losses fail this scenario (QoS 1/2, retained, idle).
    pub must_not_lose: bool,
    /// Messages delivered more than once.
    pub duplicates: u64,
    /// Messages of other runs or programs.
    pub strays: u64,
    /// First message sent → last message received, in seconds.
    pub wall_secs: f64,
    /// The window over which CPU time was read (start → end of the measured phase).
    pub cpu_window_secs: f64,
    /// The generator's user + system CPU seconds in that window.
    pub cpu_secs: Option<f64>,
    /// The broker's CPU seconds in that window (with `--broker-pid`).
    pub broker_cpu_secs: Option<f64>,
    /// The whole scenario including connecting and cleaning up, in seconds.
    pub total_secs: f64,
    /// Count multiplier used.
    pub scale: f64,
    /// Remarks (e.g. RSS unknown without `--broker-pid`).
    pub notes: Vec<String>,
}

impl Report {
    /// Generator CPU seconds per wall second of the CPU window (1.0 = one core busy).
    pub fn generator_cores(&self) -> Option<f64> {
        let cpu = self.cpu_secs?;
        (self.cpu_window_secs > 0.0).then(|| cpu / self.cpu_window_secs)
    }

    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// One line for people.
    pub fn to_text(&self) -> String {
        let status = if self.ok { "ok  " } else { "FAIL" };
        let figures = self
            .figures
            .iter()
            .map(|f| match f.value {
                Some(v) => format!("{} {} {}", f.name, human(v), f.unit),
                None => format!("{} unknown", f.name),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut line = format!(
            "{:<11} {status} {figures} | lost {} of {}",
            self.scenario, self.lost, self.expected
        );
        if self.duplicates > 0 {
            line += &format!(", {} duplicates", self.duplicates);
        }
        if self.strays > 0 {
            line += &format!(", {} strays", self.strays);
        }
        line += &format!(" | window {:.3} s", self.wall_secs);
        if let Some(cpu) = self.cpu_secs {
            line += &format!(" | generator CPU {}", cpu_share(cpu, self.cpu_window_secs));
        }
        if let Some(b) = self.broker_cpu_secs {
            line += &format!(", broker CPU {b:.2} s");
        }
        if let Some(why) = &self.failure {
            line += &format!(" | {why}");
        }
        for note in &self.notes {
            line += &format!(" | {note}");
        }
        line
    }
}

/// `"1.23 s (45% of a core)"`: CPU seconds and their share of the window, the share only for
/// windows of at least [`MIN_SHARE_WINDOW_SECS`] (/proc counts CPU time in 10 ms ticks, so a
/// share of a shorter window means little).
pub fn cpu_share(cpu_secs: f64, window_secs: f64) -> String {
    if window_secs >= MIN_SHARE_WINDOW_SECS {
        format!(
            "{cpu_secs:.2} s ({:.0}% of a core)",
            cpu_secs / window_secs * 100.0
        )
    } else {
        format!("{cpu_secs:.2} s")
    }
}

/// A target a figure is held against (the figures issue #5 asks for).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Target {
    /// The figure's name.
    pub figure: &'static str,
    /// The bound: at least this (`better: higher`) or less than this (`better: lower`).
    pub bound: f64,
    /// The figure's unit.
    pub unit: &'static str,
    /// Which direction is better.
    pub better: Better,
    /// Whether the figure met it; `None` when the figure is unknown.
    pub met: Option<bool>,
}

impl Target {
    /// The target for `figure` among `figures`.
    pub fn check(figures: &[Figure], figure: &'static str, bound: f64, better: Better) -> Target {
        let found = figures.iter().find(|f| f.name == figure);
        let value = found.and_then(|f| f.value);
        Target {
            figure,
            bound,
            unit: found.map(|f| f.unit).unwrap_or(""),
            better,
            met: value.map(|v| match better {
                Better::Higher => v >= bound,
                Better::Lower => v < bound,
            }),
        }
    }

    /// `"throughput ≥ 250,000 points/s: met"`.
    pub fn to_text(&self) -> String {
        let op = match self.better {
            Better::Higher => "≥",
            Better::Lower => "<",
        };
        let verdict = match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "unknown",
        };
        format!(
            "target {} {op} {} {}: {verdict}",
            self.figure,
            human(self.bound),
            self.unit
        )
    }
}

/// The result of one `stratus bench http` scenario.
#[derive(Debug, Clone, Serialize)]
pub struct HttpReport {
    /// Scenario name.
    pub scenario: &'static str,
    /// False when a request failed, a check of the answers failed, or it timed out.
    pub ok: bool,
    /// Why it failed, when it did.
    pub failure: Option<String>,
    /// Whether `--timeout` ended it.
    pub timed_out: bool,
    /// The figures.
    pub figures: Vec<Figure>,
    /// The targets and whether the figures met them (informative: a miss is not a
    /// failure).
    pub targets: Vec<Target>,
    /// Keep-alive connections of the measured phase.
    pub connections: u32,
    /// Requests the scenario meant to send (the requests sent, for a timed scenario).
    pub requests: u64,
    /// Requests sent.
    pub sent: u64,
    /// Requests answered as expected (202 for ingestion, 200 for queries).
    pub acknowledged: u64,
    /// Requests that failed: another status, a broken connection, a wrong answer.
    pub errors: u64,
    /// Telemetry points acknowledged (202 = durable).
    pub points: u64,
    /// Start of the measured phase → last answer, in seconds.
    pub wall_secs: f64,
    /// The window over which CPU time was read (start → end of the measured phase).
    pub cpu_window_secs: f64,
    /// The generator's user + system CPU seconds in that window.
    pub cpu_secs: Option<f64>,
    /// The server's CPU seconds in that window (with `--server-pid`).
    pub server_cpu_secs: Option<f64>,
    /// The whole scenario including tokens, connecting and loading, in seconds.
    pub total_secs: f64,
    /// The machine's 1/5/15-minute load averages when the scenario started.
    pub loadavg_before: Option<[f64; 3]>,
    /// The same when it ended.
    pub loadavg_after: Option<[f64; 3]>,
    /// Count multiplier used.
    pub scale: f64,
    /// Remarks (load phase of `aggregate`, what was checked).
    pub notes: Vec<String>,
}

impl HttpReport {
    /// One JSON object on one line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// One line for people.
    pub fn to_text(&self) -> String {
        let status = if self.ok { "ok  " } else { "FAIL" };
        let figures = self
            .figures
            .iter()
            .map(|f| match f.value {
                Some(v) => format!("{} {} {}", f.name, human(v), f.unit),
                None => format!("{} unknown", f.name),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let mut line = format!(
            "{:<13} {status} {figures} | {} of {} requests acknowledged, {} errors | window {:.3} s",
            self.scenario,
            human_count(self.acknowledged),
            human_count(self.requests),
            self.errors,
            self.wall_secs
        );
        if let Some(cpu) = self.cpu_secs {
            line += &format!(" | generator CPU {}", cpu_share(cpu, self.cpu_window_secs));
        }
        if let Some(cpu) = self.server_cpu_secs {
            line += &format!(", server CPU {}", cpu_share(cpu, self.cpu_window_secs));
        }
        if let (Some(a), Some(b)) = (self.loadavg_before, self.loadavg_after) {
            line += &format!(" | load {:.2} → {:.2}", a[0], b[0]);
        }
        for t in &self.targets {
            line += &format!(" | {}", t.to_text());
        }
        if let Some(why) = &self.failure {
            line += &format!(" | {why}");
        }
        for note in &self.notes {
            line += &format!(" | {note}");
        }
        line
    }
}

/// A count with thousands separators.
pub fn human_count(n: u64) -> String {
    if n < 1000 {
        n.to_string()
    } else {
        human(n as f64)
    }
}

/// A number with thousands separators, or with decimals when small.
pub fn human(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    if v.abs() >= 1000.0 {
        let s = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Report {
        Report {
            scenario: "fanin-qos1",
            ok: false,
            failure: Some("lost 3 QoS 1 messages".into()),
            timed_out: false,
            figures: vec![Figure::new(
                "throughput",
                Some(1_234_567.8),
                "msg/s",
                Better::Higher,
            )],
            expected: 1_000_000,
            sent: 1_000_000,
            received: 999_997,
            lost: 3,
            must_not_lose: true,
            duplicates: 0,
            strays: 0,
            wall_secs: 0.81,
            cpu_window_secs: 1.0,
            cpu_secs: Some(0.5),
            broker_cpu_secs: None,
            total_secs: 1.2,
            scale: 1.0,
            notes: vec![],
        }
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(human(1_234_567.8), "1,234,568");
        assert_eq!(human(1000.0), "1,000");
        assert_eq!(human(999.0), "999.0");
        assert_eq!(human(-12_345.0), "-12,345");
        assert_eq!(human(4.56789), "4.57");
    }

    #[test]
    fn json_has_the_fields_compare_sh_reads() {
        let v: serde_json::Value = serde_json::from_str(&report().to_json()).unwrap();
        assert_eq!(v["scenario"], "fanin-qos1");
        assert_eq!(v["lost"], 3);
        assert_eq!(v["figures"][0]["unit"], "msg/s");
        assert_eq!(v["figures"][0]["better"], "higher");
        assert_eq!(v["cpu_secs"], 0.5);
        assert!(v["broker_cpu_secs"].is_null());
        assert!(!report().to_json().contains('\n'));
    }

    #[test]
    fn cpu_shares_only_for_long_windows() {
        assert_eq!(cpu_share(0.5, 1.0), "0.50 s (50% of a core)");
        assert_eq!(cpu_share(3.0, 2.0), "3.00 s (150% of a core)");
        assert_eq!(cpu_share(0.01, 0.1), "0.01 s");
    }

    #[test]
    fn targets_say_whether_they_were_met() {
        let figures = vec![
            Figure::new("throughput", Some(260_000.0), "points/s", Better::Higher),
            Figure::new("median", Some(1000.0), "ms", Better::Lower),
            Figure::new("p99", None, "ms", Better::Lower),
        ];
        let t = Target::check(&figures, "throughput", 250_000.0, Better::Higher);
        assert_eq!(t.met, Some(true));
        assert_eq!(t.to_text(), "target throughput ≥ 250,000 points/s: met");
        let t = Target::check(&figures, "median", 1000.0, Better::Lower);
        assert_eq!(t.met, Some(false));
        assert_eq!(t.to_text(), "target median < 1,000 ms: MISSED");
        assert_eq!(Target::check(&figures, "p99", 1.0, Better::Lower).met, None);
        assert_eq!(human_count(999), "999");
        assert_eq!(human_count(5_000_000), "5,000,000");
    }

    fn http_report() -> HttpReport {
        let figures = vec![Figure::new(
            "throughput",
            Some(21_000.0),
            "requests/s",
            Better::Higher,
        )];
        HttpReport {
            scenario: "ingest-single",
            ok: true,
            failure: None,
            timed_out: false,
            targets: vec![Target::check(
                &figures,
                "throughput",
                20_000.0,
                Better::Higher,
            )],
            figures,
            connections: 64,
            requests: 210_000,
            sent: 210_000,
            acknowledged: 210_000,
            errors: 0,
            points: 210_000,
            wall_secs: 10.0,
            cpu_window_secs: 10.0,
            cpu_secs: Some(2.5),
            server_cpu_secs: Some(15.0),
            total_secs: 12.0,
            loadavg_before: Some([0.5, 0.4, 0.3]),
            loadavg_after: Some([2.1, 1.0, 0.5]),
            scale: 1.0,
            notes: vec![],
        }
    }

    #[test]
    fn http_reports_read_as_text_and_json() {
        let t = http_report().to_text();
        assert!(
            t.starts_with("ingest-single ok   throughput 21,000 requests/s"),
            "{t}"
        );
        assert!(
            t.contains("210,000 of 210,000 requests acknowledged, 0 errors"),
            "{t}"
        );
        assert!(t.contains("generator CPU 2.50 s (25% of a core)"), "{t}");
        assert!(t.contains("server CPU 15.00 s (150% of a core)"), "{t}");
        assert!(t.contains("load 0.50 → 2.10"), "{t}");
        assert!(
            t.contains("target throughput ≥ 20,000 requests/s: met"),
            "{t}"
        );
        let json = http_report().to_json();
        assert!(!json.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["scenario"], "ingest-single");
        assert_eq!(v["errors"], 0);
        assert_eq!(v["targets"][0]["met"], true);
        assert_eq!(v["targets"][0]["bound"], 20_000.0);
        assert_eq!(v["loadavg_before"][0], 0.5);
        assert_eq!(v["figures"][0]["better"], "higher");
    }

    #[test]
    fn text_names_the_failure() {
        let t = report().to_text();
        assert!(t.contains("FAIL"), "{t}");
        assert!(t.contains("1,234,568 msg/s"), "{t}");
        assert!(t.contains("lost 3 QoS 1 messages"), "{t}");
        assert!(t.contains("50% of a core"), "{t}");
    }
}
