//! Idle connections: connect rate, and the broker's resident memory per connection.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;

use super::{Ctx, Extra};
use crate::client::connect_idle;
use crate::group::bounded;
use crate::procfs;
use crate::progress::Progress;
use crate::report::{Better, Figure};

/// Connections at scale 1.
pub const CONNECTIONS: u64 = 10_000;

/// Handshakes in flight per task.
const CONCURRENCY: usize = 64;

/// File descriptors the generator needs besides the idle connections.
const SPARE_FDS: u64 = 256;

/// Runs the idle scenario.
pub async fn run(ctx: Ctx, progress: Arc<Progress>) -> anyhow::Result<Extra> {
    let n = ctx.scaled(CONNECTIONS) as usize;
    if let Some(limit) = procfs::open_file_limit() {
        if limit < n as u64 + SPARE_FDS {
            bail!(
                "idle needs {} open files but the limit is {limit}: raise it (ulimit -n)",
                n as u64 + SPARE_FDS
            );
        }
    }
    let mut notes = Vec::new();
    let rss_before = ctx.broker_pid.and_then(procfs::rss_kib);
    let addr = ctx.addr;
    let prefix = Arc::new(ctx.client_id_prefix('i'));
    let p = progress.clone();

    progress.begin();
    let streams = bounded(n, CONCURRENCY, move |i| {
        let (prefix, progress) = (prefix.clone(), p.clone());
        async move {
            let stream = connect_idle(addr, &format!("{prefix}{i}")).await?;
            progress.received.fetch_add(1, Relaxed);
            progress.mark_received(progress.now_ns());
            Ok(stream)
        }
    })
    .await?;
    progress.end();

    // Let the broker finish what it does after CONNACK before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = ctx.broker_pid.and_then(procfs::rss_kib);
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / n as f64),
        _ => {
            notes.push(match ctx.broker_pid {
                None => "broker RSS unknown (no --broker-pid)".to_owned(),
                Some(pid) => format!("broker RSS unknown (cannot read /proc/{pid}/status)"),
            });
            None
        }
    };
    let mut figures = vec![Figure::new(
        "rss_per_conn",
        per_conn,
        "KiB/conn",
        Better::Lower,
    )];
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        notes.push(format!("broker RSS {b} KiB → {a} KiB"));
        figures.push(Figure::new(
            "rss_after",
            Some(a as f64 / 1024.0),
            "MiB",
            Better::Lower,
        ));
    }

    // Every connection must still be open: none idle-timed-out or dropped.
    let mut closed = 0u64;
    let mut probe = [0u8; 64];
    for s in &streams {
        match s.try_read(&mut probe) {
            Ok(0) => closed += 1,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => closed += 1,
        }
    }
    progress.lost_extra.fetch_add(closed, Relaxed);
    for s in &streams {
        let _ = s.try_write(&[0xE0, 0]);
    }
    drop(streams);
    Ok(Extra { figures, notes })
}
