//! A scenario's result — figures with units, losses, times, CPU — as text or one JSON line.

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
        match (self.cpu_secs, self.generator_cores()) {
            // /proc counts CPU time in 10 ms ticks: a share of a shorter window means little.
            (Some(cpu), Some(cores)) if self.cpu_window_secs >= MIN_SHARE_WINDOW_SECS => {
                line += &format!(
                    " | generator CPU {cpu:.2} s ({:.0}% of a core)",
                    cores * 100.0
                );
            }
            (Some(cpu), _) => line += &format!(" | generator CPU {cpu:.2} s"),
            (None, _) => {}
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
    fn text_names_the_failure() {
        let t = report().to_text();
        assert!(t.contains("FAIL"), "{t}");
        assert!(t.contains("1,234,568 msg/s"), "{t}");
        assert!(t.contains("lost 3 QoS 1 messages"), "{t}");
        assert!(t.contains("50% of a core"), "{t}");
    }
}
