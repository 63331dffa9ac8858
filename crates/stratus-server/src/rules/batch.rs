//! The records of one stored message as the rules engine and the live stream read them: flat
//! vectors with each distinct key stored once, built while the pipeline moves the points to
//! the store, so reading them costs no allocation per record.

use serde_json::{Map, Value as Json};

use crate::ingest::Value;

/// Keys of a message past which [`Batch::push`] looks keys up in a map instead of scanning.
const SCAN_KEYS: usize = 16;

/// The records of one message, in order.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The distinct keys, in order of first appearance.
    keys: Vec<String>,
    /// Key → its index in `keys`, once there are more than [`SCAN_KEYS`].
    lookup: Option<std::collections::HashMap<String, u32>>,
    /// `(key index, value)` of every record, record after record.
    values: Vec<(u32, Value)>,
    /// `(ts, end of its values in values)` of every record.
    records: Vec<(i64, u32)>,
    /// Start of the previous record's values (for guessing the next key).
    previous: u32,
    /// Start of the current record's values.
    current: u32,
}

/// One record of a [`Batch`].
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Measurement time, epoch ms.
    pub ts: i64,
    /// `(key index, value)`; the key is [`Batch::key`] of the index.
    pub values: &'a [(u32, Value)],
    keys: &'a [String],
}

impl<'a> Record<'a> {
    /// The key of a key index.
    pub fn key(&self, index: u32) -> &'a str {
        self.keys.get(index as usize).map_or("", String::as_str)
    }

    /// `(key, value)` of the record, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
        let keys = self.keys;
        self.values
            .iter()
            .map(move |(k, v)| (keys.get(*k as usize).map_or("", String::as_str), v))
    }

    /// The record's values as a JSON object (for alarms and the live stream).
    pub fn to_map(&self) -> Map<String, Json> {
        self.iter()
            .map(|(k, v)| (k.to_owned(), to_json(v)))
            .collect()
    }
}

/// A record value as JSON.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Number(n) => Json::from(*n),
        Value::Bool(b) => Json::Bool(*b),
        Value::Text(t) => Json::String(t.clone()),
    }
}

impl Batch {
    /// An empty batch with room for `records` records of `points` values in all.
    pub fn with_capacity(records: usize, points: usize) -> Batch {
        Batch {
            values: Vec::with_capacity(points),
            records: Vec::with_capacity(records),
            ..Batch::default()
        }
    }

    /// The records of JSON objects (tests and callers that have maps); values that are not
    /// numbers, booleans or strings are left out.
    pub fn from_maps<'m>(records: impl IntoIterator<Item = (i64, &'m Map<String, Json>)>) -> Batch {
        let mut b = Batch::default();
        for (ts, values) in records {
            b.begin(ts);
            for (k, v) in values {
                let v = match v {
                    Json::Number(n) => n.as_f64().map(Value::Number),
                    Json::Bool(x) => Some(Value::Bool(*x)),
                    Json::String(s) => Some(Value::Text(s.clone())),
                    _ => None,
                };
                if let Some(v) = v {
                    b.push(k, v);
                }
            }
        }
        b
    }

    /// Starts the next record.
    pub fn begin(&mut self, ts: i64) {
        let start = self.values.len() as u32;
        self.previous = self.current;
        self.current = start;
        self.records.push((ts, start));
    }

    /// Adds a value to the current record (keys are unique within a record).
    pub fn push(&mut self, key: &str, value: Value) {
        if self.records.is_empty() {
            return;
        }
        let index = self.intern(key);
        self.values.push((index, value));
        if let Some(last) = self.records.last_mut() {
            last.1 = self.values.len() as u32;
        }
    }

    /// The index of `key`, guessing first that it sits where it sat in the previous record.
    fn intern(&mut self, key: &str) -> u32 {
        let position = self.values.len() - self.current as usize;
        let guess = self.previous as usize + position;
        if guess < self.current as usize {
            if let Some((k, _)) = self.values.get(guess) {
                if self.keys.get(*k as usize).is_some_and(|s| s == key) {
                    return *k;
                }
            }
        }
        if let Some(map) = &self.lookup {
            if let Some(&i) = map.get(key) {
                return i;
            }
        } else if let Some(i) = self.keys.iter().position(|k| k == key) {
            return i as u32;
        }
        let i = self.keys.len() as u32;
        self.keys.push(key.to_owned());
        match &mut self.lookup {
            Some(map) => {
                map.insert(key.to_owned(), i);
            }
            None if self.keys.len() > SCAN_KEYS => {
                self.lookup = Some(
                    self.keys
                        .iter()
                        .enumerate()
                        .map(|(i, k)| (k.clone(), i as u32))
                        .collect(),
                );
            }
            None => {}
        }
        i
    }

    /// The distinct keys, by key index.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The records, in order.
    pub fn records(&self) -> impl Iterator<Item = Record<'_>> + '_ {
        let mut start = 0usize;
        self.records.iter().map(move |&(ts, end)| {
            let end = end as usize;
            let values = self.values.get(start..end).unwrap_or(&[]);
            start = end;
            Record {
                ts,
                values,
                keys: &self.keys,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn records_keep_their_values_and_keys_are_stored_once() {
        let mut b = Batch::with_capacity(3, 5);
        b.begin(1);
        b.push("t", Value::Number(1.5));
        b.push("h", Value::Bool(true));
        b.begin(2);
        b.push("t", Value::Number(2.0));
        b.push("h", Value::Text("x".into()));
        b.begin(3);
        b.push("h", Value::Number(3.0));
        b.push("z", Value::Number(4.0));
        b.begin(4);
        assert_eq!(b.keys(), ["t", "h", "z"]);
        assert_eq!(b.len(), 4);
        let maps: Vec<(i64, Json)> = b
            .records()
            .map(|r| (r.ts, Json::Object(r.to_map())))
            .collect();
        assert_eq!(
            maps,
            [
                (1, json!({"t": 1.5, "h": true})),
                (2, json!({"t": 2.0, "h": "x"})),
                (3, json!({"h": 3.0, "z": 4.0})),
                (4, json!({})),
            ]
        );
    }

    #[test]
    fn many_keys_are_interned_through_a_map() {
        let mut b = Batch::default();
        for ts in 0..3 {
            b.begin(ts);
            // A different order in each record defeats the positional guess.
            for i in 0..40 {
                let k = (i * 7 + ts as usize * 3) % 40;
                b.push(&format!("k{k}"), Value::Number(k as f64));
            }
        }
        assert_eq!(b.keys().len(), 40);
        for r in b.records() {
            assert_eq!(r.values.len(), 40);
            for (k, v) in r.iter() {
                assert_eq!(Some(k), Some(format!("k{}", v_num(v)).as_str()));
            }
        }
        let from = Batch::from_maps([(5, json!({"a": 1, "b": [1]}).as_object().unwrap())]);
        assert_eq!(from.keys(), ["a"], "arrays are not record values");
    }

    fn v_num(v: &Value) -> u32 {
        match v {
            Value::Number(n) => *n as u32,
            _ => u32::MAX,
        }
    }
}
