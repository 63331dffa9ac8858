//! What a device reports about its configuration, the same for every transport: HTTP
//! `PUT /api/v1/devices/{id}/config/reported`, MQTT `devices/{id}/config/reported` and CoAP
//! `PUT /config/reported` all go through [`report`] (or [`store_reported`] once the body is
//! parsed), so each of them stores the document and marks the device as heard from: its
//! `last_seen` in the same store job, and then the rules runtime's view (`online` of HTTP and
//! CoAP devices, silent-device rules), as a telemetry message does.
//!
//! A configuration is a JSON object; anything else is [`StoreError::Invalid`], which each
//! transport answers in its own words (HTTP 400, CoAP 4.00, MQTT 5 PUBACK 0x99).

use serde_json::Value;
use stratus_store::{Output, ReportedConfig, StoreError, StoreHandle, Write};

use crate::pipeline::Source;
use crate::rules::Rules;

/// Refuses a configuration that is not a JSON object (desired and reported alike).
pub fn check_config(value: &Value) -> Result<(), StoreError> {
    if value.is_object() {
        Ok(())
    } else {
        Err(StoreError::Invalid(
            "a configuration must be a JSON object".into(),
        ))
    }
}

/// Parses a configuration: a JSON object, or [`StoreError::Invalid`] saying why not.
pub fn parse_config(payload: &[u8]) -> Result<Value, StoreError> {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|e| StoreError::Invalid(format!("a configuration must be JSON: {e}")))?;
    check_config(&value)?;
    Ok(value)
}

/// Records the configuration device `id` reports over `source` (a JSON object) and that it
/// was heard from now, in one store job; then tells `rules`.
pub async fn store_reported(
    store: &StoreHandle,
    rules: Option<&Rules>,
    id: &str,
    value: Value,
    source: Source,
) -> Result<ReportedConfig, StoreError> {
    check_config(&value)?;
    let now = crate::persist::now_ms() as i64;
    let outputs = store
        .write(vec![
            Write::PutReportedConfig {
                id: id.to_string(),
                value,
                now_ms: now,
            },
            Write::TouchDevice {
                id: id.to_string(),
                seen_at_ms: now,
            },
        ])
        .await?;
    let reported = match outputs.into_iter().next() {
        Some(Output::Reported(r)) => r,
        _ => {
            return Err(StoreError::Internal(
                "the store did not answer the reported config".into(),
            ))
        }
    };
    if let Some(rules) = rules {
        rules.heard(id, source.label(), now);
    }
    Ok(reported)
}

/// [`parse_config`] then [`store_reported`]: a device's reported-config message as it came.
pub async fn report(
    store: &StoreHandle,
    rules: Option<&Rules>,
    id: &str,
    payload: &[u8],
    source: Source,
) -> Result<ReportedConfig, StoreError> {
    let value = parse_config(payload)?;
    store_reported(store, rules, id, value, source).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_must_be_objects() {
        assert!(parse_config(br#"{"a": 1}"#).is_ok());
        for bad in [&b"[1]"[..], b"3", b"null", b"{", b""] {
            assert!(matches!(parse_config(bad), Err(StoreError::Invalid(_))));
        }
    }
}
