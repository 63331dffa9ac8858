//! The rules engine: rule definitions as the API accepts them ([`RuleDef`]), their compiled
//! form ([`CompiledRule`]), the sans-IO evaluation state machine ([`engine::Engine`]), and the
//! runtime around it ([`service::Rules`]): the hook on the ingestion path, the 1 s timer for
//! `for_s` and silent rules, the bounded action queue and its worker, and device connectivity.
//!
//! ## A rule
//! ```json
//! {"id": "hot", "name": "Too hot", "selector": {"devices": ["d1"], "id_glob": "demo-*",
//!  "attributes": {"site": "a"}}, "condition": "temperature > 30 && humidity < 20",
//!  "for_s": 300, "kind": "expression", "severity": "major",
//!  "actions": [{"type": "alarm"}, {"type": "republish", "topic": "alerts/{device}", "qos": 1},
//!              {"type": "webhook", "url": "http://…", "timeout_ms": 2000, "retries": 3},
//!              {"type": "set_config", "key": "fan", "value": "on"}],
//!  "enabled": true}
//! ```
//! - `selector`: every part optional, all given parts must match; empty: every device.
//! - `condition`: a [CEL](https://cel.dev) expression over the record's keys (numbers are
//!   doubles): `&&`, `||`, `!`, comparisons, arithmetic, `'strings'`, `k in [..]`,
//!   `mode.startsWith('e')`. `rate(key)` is the change of `key` per second since the device's
//!   previous record that had it (absent on the first one). A record with none of the
//!   condition's keys leaves the rule's state as it is; a key it lacks, or any evaluation
//!   error, makes the condition false.
//! - `for_s`: the condition must hold that long (checked on every record and every second)
//!   before the rule fires.
//! - `kind: "silent"` with `silent_s: N` instead of a condition: fires when a device (that was
//!   heard from since the server started, or has a `last_seen`) is not heard from for N s.
//! - `actions` (default `[{"type": "alarm"}]`) run when the rule fires and when it stops
//!   holding: `alarm` raises an alarm and clears it; `republish` publishes the alarm JSON
//!   (`{device}` and `{rule}` in the topic are replaced); `webhook` POSTs the alarm JSON;
//!   `set_config` sets one key of the device's desired configuration when the rule fires.
//!
//! An alarm: `{"id", "rule", "device", "severity", "state": "active" | "acknowledged" |
//! "cleared", "message", "value": {…record values…}, "raised_at", "acked_at", "cleared_at"}`
//! (epoch ms or `null`). At most one open alarm per (device, rule).
//!
//! ## Evaluation and what it costs
//! Rules run on the ingestion path, after the durable write, under one engine lock per
//! message. The pipeline hands over the message's records as a [`Batch`] (flat vectors, each
//! key stored once, built while the points move to the store, and only when an enabled
//! expression rule exists or the live stream has readers). Per message, the device's
//! selected rules and their index are looked up once (cached per device; devices selecting
//! the same rules share one index; rebuilt after any rule or attribute change). Per record:
//! - conditions made of numeric comparisons of a key or `rate(key)` with a literal, joined
//!   by `&&`, `||` and `!` (the common shape) have a native form; the index keeps their
//!   comparisons sorted by key and literal, and a binary search per record value (one
//!   comparison when the value is below every threshold) finds the rules that can hold
//!   (`index.rs` explains why that is exact). Only those, the rules with state for the device
//!   (holding, waiting for `for_s`, or with an open alarm) and the other conditions that read
//!   one of the record's keys (evaluated by CEL, in one scope per record) are evaluated;
//! - `rate(key)` keeps the device's previous value of the key, looked up once per message;
//! - nothing is allocated for a record unless a rule holds for it (then its values are kept
//!   for the alarm).
//!
//! Differential tests check the native form and the index against CEL on random rules,
//! records, timestamps and message sizes (`engine::tests`, `condition::tests`).
//!
//! Measured with `stratus bench http --rules 100` (100 rules on the bench devices that every
//! record reaches: thresholds and `rate()` joined by `||`, never holding) against the same run
//! without `--rules`, release build, a fresh server and data dir per run, runs alternating,
//! on the shared 2-core machine (load average 2–5 from other work, so single runs vary by
//! ±30 %; server CPU is the steadier figure), builds `63b175d` and `4d726f7`:
//! - `ingest-batch --scale 0.4` (2,000,000 points in 1,000-record batches), two series of
//!   alternating runs: without rules 425.6k, 435.1k, 398.2k, 291.0k, 521.0k, 299.5k, 234.8k
//!   points/s (mean 372.2k), with 100 rules 424.9k, 433.8k, 361.5k, 291.2k, 281.2k, 424.1k,
//!   244.5k (mean 351.6k, 94 %); server CPU 3.25–5.10 s without (mean 4.20 s) and 3.33–5.17 s
//!   with (mean 4.43 s, +5 %). A profile (`perf record -g` on the server) puts the rules path
//!   at about 3 % of the server's CPU.
//! - `ingest-single --scale 0.5` (one record per request, 64 connections, 5 s), four
//!   alternating pairs: 9.6k, 13.7k, 16.4k, 9.7k req/s with 100 rules (mean 12.4k) and 7.4k,
//!   16.6k, 11.9k, 10.7k without (mean 11.7k); server CPU per request 64.4 µs with and
//!   64.6 µs without: no cost to see.
//! - Before this index (every selected rule evaluated on every record, each record a JSON
//!   map) the batch run at `--scale 0.2` gave 201.5k and 256.1k points/s without rules and
//!   90.5k and 75.9k with them (server CPU 3.0–3.2 s against 7.3–8.7 s per 1,000,000 points).
//!
//! `--rules-mix mixed` installs rules that do hold for part of the records (thresholds inside
//! the bench values, `&&`/`||`/`!`, `rate()`, `==`, `for_s` of an hour so they hold and stop
//! holding without firing; a tenth select by an attribute no bench device has). Many of them
//! hold for any record, and each one that holds keeps state for the device, so every record
//! evaluates dozens of rules exactly: `ingest-batch --scale 0.4` gave 133.2k, 184.5k, 172.0k
//! points/s, alternating with the runs above (server CPU 9.1–10.1 s: about 2.5 µs more per
//! record than without rules). The cost grows with the rules that hold (or wait for
//! `for_s`), not with the rules installed.
//!
//! ## Dependencies
//! - `cel`: the Common Expression Language of the cel-rust project (the maintained successor
//!   of `cel-interpreter`): a specified, side-effect-free, non-Turing-complete language with
//!   parse errors that carry line and column; `evalexpr` was the other candidate but is
//!   AGPL-licensed and its errors carry no position.
//! - `reqwest` (already in the workspace): the webhook client, with timeouts and rustls.

pub mod batch;
pub mod condition;
pub mod engine;
mod index;
pub mod service;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

pub use batch::Batch;
pub use condition::{Condition, ConditionError};
pub use engine::Engine;
pub use service::Rules;

/// Which devices a rule looks at.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Selector {
    /// Only these device ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// Only ids matching this glob (`*` any run, `?` one character).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_glob: Option<String>,
    /// Only devices whose attributes have these values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Map<String, Json>>,
}

impl Selector {
    /// Whether a device with this id matches, whatever its attributes.
    pub fn matches_id(&self, device: &str) -> bool {
        if let Some(list) = &self.devices {
            if !list.iter().any(|d| d == device) {
                return false;
            }
        }
        if let Some(glob) = &self.id_glob {
            if !glob_match(glob.as_bytes(), device.as_bytes()) {
                return false;
            }
        }
        true
    }

    /// Whether it needs the device's attributes.
    pub fn needs_attributes(&self) -> bool {
        self.attributes.as_ref().is_some_and(|a| !a.is_empty())
    }

    /// Whether a device with this id and these attributes (`None`: not known) matches.
    pub fn matches(&self, device: &str, attributes: Option<&Json>) -> bool {
        if !self.matches_id(device) {
            return false;
        }
        match &self.attributes {
            Some(want) if !want.is_empty() => {
                let Some(have) = attributes.and_then(Json::as_object) else {
                    return false;
                };
                want.iter().all(|(k, v)| have.get(k) == Some(v))
            }
            _ => true,
        }
    }
}

/// `*` matches any run, `?` one byte; everything else itself.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// What kind of rule.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A condition over each record.
    #[default]
    Expression,
    /// Fires when a device is not heard from for `silent_s`.
    Silent,
}

/// How bad an alarm is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Critical.
    Critical,
    /// Major (the default).
    #[default]
    Major,
    /// Minor.
    Minor,
    /// Warning.
    Warning,
    /// Informational.
    Info,
}

impl Severity {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Major => "major",
            Severity::Minor => "minor",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// What a rule does when it fires (and stops holding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Raise an alarm while the rule holds, clear it when it stops.
    Alarm,
    /// Publish the alarm JSON on an MQTT topic (`{device}`, `{rule}` replaced).
    Republish {
        /// Topic template.
        topic: String,
        /// 0 or 1.
        #[serde(default)]
        qos: u8,
    },
    /// POST the alarm JSON to a URL.
    Webhook {
        /// `http://` or `https://` URL.
        url: String,
        /// Timeout of each attempt.
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
        /// Attempts after the first, with exponential back-off (200 ms, 400 ms, …).
        #[serde(default = "default_retries")]
        retries: u32,
    },
    /// Set one key of the device's desired configuration when the rule fires.
    SetConfig {
        /// The key.
        key: String,
        /// Its value.
        value: Json,
    },
}

fn default_timeout_ms() -> u64 {
    2000
}

fn default_retries() -> u32 {
    3
}

fn default_true() -> bool {
    true
}

/// A rule as the API takes and shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    /// Id (generated when absent on create).
    #[serde(default)]
    pub id: Option<String>,
    /// Display name (the id when absent).
    #[serde(default)]
    pub name: Option<String>,
    /// Which devices.
    #[serde(default)]
    pub selector: Selector,
    /// The condition (expression rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// Seconds the condition must hold before the rule fires.
    #[serde(default)]
    pub for_s: u64,
    /// Expression or silent.
    #[serde(default)]
    pub kind: Kind,
    /// Silence that fires a silent rule, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub silent_s: Option<u64>,
    /// Severity of its alarms.
    #[serde(default)]
    pub severity: Severity,
    /// What it does (default: an alarm).
    #[serde(default)]
    pub actions: Option<Vec<Action>>,
    /// Whether it runs.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// When it was created, epoch ms (set by the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<i64>,
}

/// Longest silence or persistence accepted, in seconds (a year).
pub const MAX_SECONDS: u64 = 366 * 86_400;

/// A rule checked and compiled.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// The definition, normalised (id, name and actions filled in).
    pub def: RuleDef,
    /// Its id.
    pub id: String,
    /// The condition (expression rules).
    pub condition: Option<Condition>,
    /// Actions to run.
    pub actions: Vec<Action>,
}

impl CompiledRule {
    /// Checks and compiles `def` (whose `id` must be set). Errors name what is wrong, with
    /// the line and column of a bad condition.
    pub fn compile(mut def: RuleDef) -> Result<CompiledRule, ConditionError> {
        let id = def
            .id
            .clone()
            .ok_or_else(|| ConditionError("a rule needs an id".into()))?;
        if !stratus_store::is_valid_id(&id) {
            return Err(ConditionError(format!(
                "rule id {:?} must match [A-Za-z0-9._-]{{1,64}}",
                id.chars().take(80).collect::<String>()
            )));
        }
        if def.name.as_deref().is_none_or(str::is_empty) {
            def.name = Some(id.clone());
        }
        if def.name.as_ref().is_some_and(|n| n.len() > 256) {
            return Err(ConditionError("the name must be at most 256 bytes".into()));
        }
        if def.for_s > MAX_SECONDS {
            return Err(ConditionError(format!(
                "for_s must be at most {MAX_SECONDS}"
            )));
        }
        let condition = match def.kind {
            Kind::Expression => {
                if def.silent_s.is_some() {
                    return Err(ConditionError(
                        "silent_s is for rules of kind \"silent\"".into(),
                    ));
                }
                let source = def
                    .condition
                    .as_deref()
                    .ok_or_else(|| ConditionError("an expression rule needs a condition".into()))?;
                Some(Condition::compile(source)?)
            }
            Kind::Silent => {
                if def.condition.is_some() {
                    return Err(ConditionError(
                        "a silent rule has silent_s instead of a condition".into(),
                    ));
                }
                match def.silent_s {
                    Some(s) if (1..=MAX_SECONDS).contains(&s) => None,
                    _ => {
                        return Err(ConditionError(format!(
                            "a silent rule needs silent_s between 1 and {MAX_SECONDS}"
                        )))
                    }
                }
            }
        };
        let actions = def.actions.clone().unwrap_or_else(|| vec![Action::Alarm]);
        if actions.len() > 16 {
            return Err(ConditionError("at most 16 actions per rule".into()));
        }
        for a in &actions {
            check_action(a)?;
        }
        def.actions = Some(actions.clone());
        if let Some(list) = &def.selector.devices {
            if list.len() > 10_000 {
                return Err(ConditionError("at most 10000 devices in a selector".into()));
            }
        }
        Ok(CompiledRule {
            def,
            id,
            condition,
            actions,
        })
    }

    /// Whether any action raises alarms.
    pub fn raises_alarms(&self) -> bool {
        self.actions.iter().any(|a| matches!(a, Action::Alarm))
    }

    /// The alarm message.
    pub fn message(&self) -> String {
        let name = self.def.name.as_deref().unwrap_or(&self.id);
        match (&self.condition, self.def.silent_s) {
            (Some(c), _) if self.def.for_s > 0 => {
                format!("{name}: {} for {} s", c.source(), self.def.for_s)
            }
            (Some(c), _) => format!("{name}: {}", c.source()),
            (None, Some(s)) => format!("{name}: not heard from for {s} s"),
            (None, None) => name.to_owned(),
        }
    }
}

fn check_action(a: &Action) -> Result<(), ConditionError> {
    match a {
        Action::Alarm => Ok(()),
        Action::Republish { topic, qos } => {
            if *qos > 1 {
                return Err(ConditionError("republish qos must be 0 or 1".into()));
            }
            if topic.is_empty()
                || topic.len() > 1024
                || topic.contains(['+', '#', '\0'])
                || topic.starts_with('$')
            {
                return Err(ConditionError(
                    "republish topic must be a non-empty topic name without wildcards".into(),
                ));
            }
            Ok(())
        }
        Action::Webhook {
            url,
            timeout_ms,
            retries,
        } => {
            if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 2048 {
                return Err(ConditionError(
                    "webhook url must be an http:// or https:// URL".into(),
                ));
            }
            if reqwest::Url::parse(url).is_err() {
                return Err(ConditionError(format!(
                    "webhook url {url:?} does not parse"
                )));
            }
            if !(1..=60_000).contains(timeout_ms) || *retries > 10 {
                return Err(ConditionError(
                    "webhook timeout_ms must be 1 to 60000 and retries at most 10".into(),
                ));
            }
            Ok(())
        }
        Action::SetConfig { key, .. } => {
            if key.is_empty() || key.len() > 256 {
                return Err(ConditionError(
                    "set_config key must be 1 to 256 bytes".into(),
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(v: Json) -> RuleDef {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn globs_match_like_shells() {
        assert!(glob_match(b"demo-*", b"demo-1"));
        assert!(glob_match(b"demo-*", b"demo-"));
        assert!(!glob_match(b"demo-*", b"dem-1"));
        assert!(glob_match(b"*-?", b"pump-7"));
        assert!(!glob_match(b"*-?", b"pump-77"));
        assert!(glob_match(b"*", b""));
        assert!(glob_match(b"a*b*c", b"aXXbYYc"));
        assert!(!glob_match(b"a*b*c", b"aXXbYY"));
    }

    #[test]
    fn selectors_match_ids_globs_and_attributes() {
        let s: Selector = serde_json::from_value(json!({
            "devices": ["demo-1", "x"], "id_glob": "demo-*", "attributes": {"site": "a"}
        }))
        .unwrap();
        let a = json!({"site": "a", "model": "t"});
        assert!(s.matches("demo-1", Some(&a)));
        assert!(!s.matches("x", Some(&a)), "glob fails");
        assert!(!s.matches("demo-2", Some(&a)), "not in the list");
        assert!(!s.matches("demo-1", Some(&json!({"site": "b"}))));
        assert!(!s.matches("demo-1", None), "attributes unknown");
        assert!(Selector::default().matches("anything", None));
    }

    #[test]
    fn rules_are_checked() {
        let ok = CompiledRule::compile(def(json!({"id": "r1", "condition": "t > 1"}))).unwrap();
        assert_eq!(ok.actions, vec![Action::Alarm], "alarm by default");
        assert_eq!(ok.def.name.as_deref(), Some("r1"));
        assert!(ok.def.enabled);
        let silent =
            CompiledRule::compile(def(json!({"id": "s", "kind": "silent", "silent_s": 60})))
                .unwrap();
        assert!(silent.condition.is_none());
        for bad in [
            json!({"id": "r", "kind": "silent"}),
            json!({"id": "r", "kind": "silent", "silent_s": 0}),
            json!({"id": "r", "kind": "silent", "silent_s": 5, "condition": "a"}),
            json!({"id": "r"}),
            json!({"id": "bad id", "condition": "t > 1"}),
            json!({"id": "r", "condition": "t > 1", "actions": [{"type": "republish", "topic": "a/#"}]}),
            json!({"id": "r", "condition": "t > 1", "actions": [{"type": "webhook", "url": "ftp://x"}]}),
            json!({"id": "r", "condition": "t > 1", "actions": [{"type": "republish", "topic": "a", "qos": 2}]}),
        ] {
            assert!(CompiledRule::compile(def(bad.clone())).is_err(), "{bad}");
        }
        assert!(serde_json::from_value::<RuleDef>(json!({"id": "r", "bogus": 1})).is_err());
        assert!(serde_json::from_value::<RuleDef>(json!({"id": "r", "severity": "meh"})).is_err());
    }
}
