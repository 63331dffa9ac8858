//! Appending to the audit log from places that must not wait for it (authentication failures
//! on a connection's hot path): the entry is written in the background, failures are logged.

use serde_json::Value as Json;
use stratus_store::{NewAuditEntry, StoreHandle};

/// Appends an entry without waiting for it to be durable.
pub fn record(store: &StoreHandle, actor: &str, action: &str, target: &str, detail: Json) {
    let store = store.clone();
    let entry = NewAuditEntry {
        ts_ms: crate::persist::now_ms() as i64,
        actor: truncate(actor, 128),
        action: action.to_string(),
        target: truncate(target, 512),
        detail,
    };
    tokio::spawn(async move {
        if let Err(e) = store.append_audit(entry).await {
            tracing::error!(error = %e, "could not append to the audit log");
        }
    });
}

/// At most `max` bytes of `s`, cut at a character boundary, control characters replaced.
fn truncate(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(if c.is_control() { '?' } else { c });
    }
    if out.is_empty() {
        out.push_str("anonymous");
    }
    out
}
