//! What /proc says about the generator and the broker (CPU time, resident memory), the
//! machine's load average, and the open-file limit.

use rustix::process::{getrlimit, setrlimit, Resource};

/// Clock ticks per second of `utime`/`stime` in /proc (USER_HZ, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// User + system CPU seconds of this process (all threads).
pub fn cpu_secs_self() -> Option<f64> {
    parse_cpu_secs(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// User + system CPU seconds of process `pid` (all threads).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    parse_cpu_secs(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `utime + stime` (fields 14 and 15) of a /proc/PID/stat line, in seconds. The command
/// name (field 2) may contain spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_secs(stat: &str) -> Option<f64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // `after` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// Resident set size of process `pid` in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    parse_vm_rss(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The 1-, 5- and 15-minute load averages of the machine (/proc/loadavg).
pub fn loadavg() -> Option<[f64; 3]> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<f64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// Raises the soft open-file limit to the hard one (10,000 idle connections need as many
/// descriptors); failures are ignored, [`open_file_limit`] tells what there is.
pub fn raise_open_file_limit() {
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

/// The soft open-file limit (`None` when unlimited).
pub fn open_file_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let stat = "1234 (tokio (rt) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_cpu_secs(stat), Some(3.25));
        assert_eq!(parse_cpu_secs("garbage"), None);
    }

    #[test]
    fn load_averages_are_the_first_three_fields() {
        assert_eq!(
            parse_loadavg("0.52 1.10 2.00 3/456 7890\n"),
            Some([0.52, 1.10, 2.00])
        );
        assert_eq!(parse_loadavg("0.52 x 2.00"), None);
        assert_eq!(parse_loadavg(""), None);
        assert!(loadavg().is_some());
    }

    #[test]
    fn own_figures_are_readable() {
        assert!(cpu_secs_self().is_some());
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert_eq!(parse_vm_rss("Name: x\nVmRSS:\t  1234 kB\n"), Some(1234));
        raise_open_file_limit();
        assert!(open_file_limit().is_none_or(|n| n > 0));
    }
}
