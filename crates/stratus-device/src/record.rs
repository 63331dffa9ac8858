//! Telemetry records and the envelope they travel in.

use serde_json::{Map, Value};

use crate::Error;

/// Field names the telemetry format gives a meaning of its own (SPEC "Telemetry record");
/// a record may not use them as series.
const RESERVED: [&str; 6] = ["ts", "date", "time", "sent", "nonce", "records"];
/// The server's default limits: longest key, longest string value, most series per record.
const MAX_KEY_LEN: usize = 128;
const MAX_TEXT_LEN: usize = 4096;
const MAX_SERIES: usize = 256;

/// One measurement: a time and named values. Each value becomes a point of the series of the
/// same name (a number, a boolean or a string).
///
/// ```
/// use stratus_device::Record;
/// let r = Record::new().with("temperature", 21.5).with("door_open", false);
/// assert_eq!(r.fields().len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Record {
    ts_ms: Option<i64>,
    fields: Map<String, Value>,
}

impl Record {
    /// A record stamped with the time [`Device::send`](crate::Device::send) takes it.
    pub fn new() -> Record {
        Record::default()
    }

    /// A record measured at `ts_ms` (epoch milliseconds).
    pub fn at(ts_ms: i64) -> Record {
        Record {
            ts_ms: Some(ts_ms),
            fields: Map::new(),
        }
    }

    /// Adds (or replaces) the value of series `key`.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Record {
        self.insert(key, value);
        self
    }

    /// Adds (or replaces) the value of series `key`.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<Value>) {
        self.fields.insert(key.into(), value.into());
    }

    /// The measurement time, when set.
    pub fn ts(&self) -> Option<i64> {
        self.ts_ms
    }

    /// The values by series name.
    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Checks what the server would refuse for sure, so one bad record never blocks a batch.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.fields.is_empty() {
            return Err(Error::InvalidRecord(
                "a record needs at least one value".into(),
            ));
        }
        if self.fields.len() > MAX_SERIES {
            return Err(Error::InvalidRecord(format!(
                "{} values; at most {MAX_SERIES} per record",
                self.fields.len()
            )));
        }
        for (key, value) in &self.fields {
            if RESERVED.contains(&key.as_str()) {
                return Err(Error::InvalidRecord(format!(
                    "{key:?} is reserved by the telemetry format (use Record::at for the time)"
                )));
            }
            if key.is_empty() || key.len() > MAX_KEY_LEN {
                return Err(Error::InvalidRecord(format!(
                    "key {key:?}: 1 to {MAX_KEY_LEN} bytes"
                )));
            }
            match value {
                Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => {}
                Value::Bool(_) => {}
                Value::String(s) if s.len() <= MAX_TEXT_LEN => {}
                Value::String(_) => {
                    return Err(Error::InvalidRecord(format!(
                        "{key}: strings are at most {MAX_TEXT_LEN} bytes"
                    )))
                }
                _ => {
                    return Err(Error::InvalidRecord(format!(
                        "{key}: a value is a finite number, a boolean or a string"
                    )))
                }
            }
        }
        Ok(())
    }

    /// The record's JSON with `ts` set.
    pub(crate) fn to_json(&self, ts_ms: i64) -> String {
        let mut map = self.fields.clone();
        map.insert("ts".into(), Value::from(ts_ms));
        Value::Object(map).to_string()
    }
}

/// A fresh nonce: 128 random bits, hex.
pub(crate) fn nonce() -> String {
    let n: u128 = rand::random();
    format!("{n:032x}")
}

/// The envelope `{"sent", "nonce", "records": [...]}` around records already serialised.
pub(crate) fn envelope<'a>(sent_ms: i64, records: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("{\"sent\":");
    out.push_str(&sent_ms.to_string());
    out.push_str(",\"nonce\":\"");
    out.push_str(&nonce());
    out.push_str("\",\"records\":[");
    for (i, r) in records.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(r);
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_json_with_fresh_nonces() {
        let a = Record::new().with("t", 1.5).to_json(10);
        let b = Record::new().with("on", true).to_json(11);
        let e1: Value =
            serde_json::from_str(&envelope(99, [a.as_str(), b.as_str()].into_iter())).unwrap();
        let e2: Value = serde_json::from_str(&envelope(99, [a.as_str()].into_iter())).unwrap();
        assert_eq!(e1["sent"], 99);
        assert_eq!(e1["records"][0]["ts"], 10);
        assert_eq!(e1["records"][1]["on"], true);
        assert_ne!(e1["nonce"], e2["nonce"]);
        assert_eq!(e1["nonce"].as_str().unwrap().len(), 32);
    }

    #[test]
    fn the_server_s_sure_refusals_are_caught_early() {
        assert!(Record::new().with("temperature", 20.1).validate().is_ok());
        assert!(Record::new().validate().is_err());
        assert!(Record::new().with("ts", 1).validate().is_err());
        assert!(Record::new().with("nonce", "x").validate().is_err());
        assert!(Record::new()
            .with("nested", serde_json::json!({"a": 1}))
            .validate()
            .is_err());
        assert!(Record::new().with("x", Value::Null).validate().is_err());
        assert!(Record::new().with("", 1).validate().is_err());
        assert!(Record::new()
            .with("s", "x".repeat(MAX_TEXT_LEN + 1))
            .validate()
            .is_err());
    }
}
