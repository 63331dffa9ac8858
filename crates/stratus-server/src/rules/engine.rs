//! The sans-IO rule state machine: given rules, records and the time, it decides when a rule
//! fires and when it stops holding for a device, and says so as [`Effect`]s. Time is always
//! passed in (epoch ms), so `for_s` and silent rules are tested on virtual time.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value as Json};
use stratus_store::{Alarm, AlarmState};

use super::condition::with_scope;
use super::{CompiledRule, Kind};

/// A rule fired or stopped holding for a device.
#[derive(Debug, Clone)]
pub enum Effect {
    /// It fired: `alarm` is new and active.
    Fired {
        /// The rule.
        rule: Arc<CompiledRule>,
        /// The alarm (stored only when the rule has an `alarm` action).
        alarm: Alarm,
    },
    /// It stopped holding: `alarm` is now cleared.
    Cleared {
        /// The rule.
        rule: Arc<CompiledRule>,
        /// The alarm.
        alarm: Alarm,
    },
}

impl Effect {
    /// The alarm of the effect.
    pub fn alarm(&self) -> &Alarm {
        match self {
            Effect::Fired { alarm, .. } | Effect::Cleared { alarm, .. } => alarm,
        }
    }

    /// The rule of the effect.
    pub fn rule(&self) -> &Arc<CompiledRule> {
        match self {
            Effect::Fired { rule, .. } | Effect::Cleared { rule, .. } => rule,
        }
    }
}

#[derive(Debug, Default)]
struct Track {
    /// Since when the condition holds (ms), if it does.
    since: Option<i64>,
    /// The values that last made it hold.
    values: Map<String, Json>,
    /// The open alarm while the rule has fired.
    alarm: Option<Alarm>,
}

/// The state of every (rule, device).
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Arc<CompiledRule>>,
    /// Device → rule → state (device first: a record looks its device up once, without
    /// allocating).
    tracks: HashMap<String, HashMap<String, Track>>,
    last_seen: HashMap<String, i64>,
    previous: HashMap<String, HashMap<String, (i64, f64)>>,
    attributes: HashMap<String, Json>,
    id_prefix: String,
    next_id: u64,
    /// Each device's expression rules and their `rate()` keys, valid while `generation`
    /// (bumped by any change of rules or attributes) is unchanged.
    selections: HashMap<String, Selection>,
    generation: u64,
}

/// The expression rules that select a device.
#[derive(Debug)]
struct Selection {
    generation: u64,
    rules: Arc<[Arc<CompiledRule>]>,
    rate_keys: Arc<[String]>,
}

impl Engine {
    /// An engine without rules; alarm ids start with `id_prefix`.
    pub fn new(id_prefix: &str) -> Engine {
        Engine {
            rules: Vec::new(),
            tracks: HashMap::new(),
            last_seen: HashMap::new(),
            previous: HashMap::new(),
            attributes: HashMap::new(),
            id_prefix: id_prefix.to_owned(),
            next_id: 0,
            selections: HashMap::new(),
            generation: 0,
        }
    }

    /// The rules, by id.
    pub fn rules(&self) -> &[Arc<CompiledRule>] {
        &self.rules
    }

    /// Adds or replaces a rule (open alarms of a replaced rule stay open).
    pub fn put_rule(&mut self, rule: CompiledRule) {
        self.generation += 1;
        let rule = Arc::new(rule);
        match self.rules.binary_search_by(|r| r.id.cmp(&rule.id)) {
            Ok(i) => self.rules[i] = rule,
            Err(i) => self.rules.insert(i, rule),
        }
    }

    /// Removes a rule; its open alarms clear.
    pub fn remove_rule(&mut self, id: &str, now: i64) -> (bool, Vec<Effect>) {
        let Ok(i) = self.rules.binary_search_by(|r| r.id.as_str().cmp(id)) else {
            return (false, Vec::new());
        };
        let rule = self.rules.remove(i);
        self.generation += 1;
        let mut effects = Vec::new();
        for inner in self.tracks.values_mut() {
            if let Some(t) = inner.remove(id) {
                if let Some(alarm) = t.alarm {
                    effects.push(clear(&rule, alarm, now));
                }
            }
        }
        self.tracks.retain(|_, inner| !inner.is_empty());
        (true, effects)
    }

    /// Takes back an alarm that was open when the server stopped.
    pub fn restore_alarm(&mut self, alarm: Alarm) {
        if !alarm.state.is_open() {
            return;
        }
        let track = self
            .tracks
            .entry(alarm.device.clone())
            .or_default()
            .entry(alarm.rule.clone())
            .or_default();
        track.since = Some(alarm.raised_at_ms);
        track.alarm = Some(alarm);
    }

    /// Remembers a device's attributes (for attribute selectors).
    pub fn set_attributes(&mut self, device: &str, attributes: Json) {
        self.selections.remove(device);
        self.attributes.insert(device.to_owned(), attributes);
    }

    /// Whether the attributes of `device` are known.
    pub fn knows_attributes(&self, device: &str) -> bool {
        self.attributes.contains_key(device)
    }

    /// Forgets a device (deleted): its tracks and what was remembered about it.
    pub fn forget_device(&mut self, device: &str) {
        self.attributes.remove(device);
        self.selections.remove(device);
        self.last_seen.remove(device);
        self.previous.remove(device);
        self.tracks.remove(device);
    }

    /// Remembers when a device was last heard from (from the store at start).
    pub fn set_last_seen(&mut self, device: &str, at: i64) {
        match self.last_seen.get_mut(device) {
            Some(e) => *e = (*e).max(at),
            None => {
                self.last_seen.insert(device.to_owned(), at);
            }
        }
    }

    /// Open alarms now.
    pub fn open_alarms(&self) -> impl Iterator<Item = &Alarm> {
        self.tracks
            .values()
            .flat_map(HashMap::values)
            .filter_map(|t| t.alarm.as_ref())
    }

    /// Whether a rule of any kind applies to the device (for skipping work).
    fn selected(&self, rule: &CompiledRule, device: &str) -> bool {
        rule.def.enabled
            && rule
                .def
                .selector
                .matches(device, self.attributes.get(device))
    }

    /// A device was heard from at `now` (any transport): clears its silent alarms.
    pub fn seen(&mut self, device: &str, now: i64) -> Vec<Effect> {
        self.set_last_seen(device, now);
        let mut effects = Vec::new();
        let Some(inner) = self.tracks.get_mut(device) else {
            return effects;
        };
        for rule in &self.rules {
            if rule.def.kind != Kind::Silent {
                continue;
            }
            if let Some(t) = inner.remove(rule.id.as_str()) {
                if let Some(alarm) = t.alarm {
                    effects.push(clear(rule, alarm, now));
                }
            }
        }
        effects
    }

    /// One stored record of `device` (measured at `ts`, received at `now`).
    pub fn on_record(
        &mut self,
        device: &str,
        ts: i64,
        values: &Map<String, Json>,
        now: i64,
    ) -> (Vec<Effect>, u64) {
        self.on_records(device, &[(ts, values.clone())], now)
    }

    /// The stored records of one message of `device`, in order (each `(ts, values)`):
    /// the device's rules are selected once, then each record is evaluated.
    pub fn on_records(
        &mut self,
        device: &str,
        records: &[(i64, Map<String, Json>)],
        now: i64,
    ) -> (Vec<Effect>, u64) {
        let mut effects = self.seen(device, now);
        let (selected, rate_keys) = self.selection(device);
        let mut evaluations = 0;
        if selected.is_empty() {
            return (effects, 0);
        }
        for (ts, values) in records {
            let (fx, n) = self.evaluate(device, &selected, &rate_keys, *ts, values, now);
            effects.extend(fx);
            evaluations += n;
        }
        (effects, evaluations)
    }

    /// The device's expression rules and their `rate()` keys (cached).
    fn selection(&mut self, device: &str) -> (Arc<[Arc<CompiledRule>]>, Arc<[String]>) {
        if let Some(s) = self.selections.get(device) {
            if s.generation == self.generation {
                return (s.rules.clone(), s.rate_keys.clone());
            }
        }
        let rules: Arc<[Arc<CompiledRule>]> = self
            .rules
            .iter()
            .filter(|r| r.condition.is_some() && self.selected(r, device))
            .cloned()
            .collect();
        let mut rate_keys: Vec<String> = rules
            .iter()
            .filter_map(|r| r.condition.as_ref())
            .flat_map(|c| c.rate_keys().iter().cloned())
            .collect();
        rate_keys.sort();
        rate_keys.dedup();
        let rate_keys: Arc<[String]> = rate_keys.into();
        self.selections.insert(
            device.to_owned(),
            Selection {
                generation: self.generation,
                rules: rules.clone(),
                rate_keys: rate_keys.clone(),
            },
        );
        (rules, rate_keys)
    }

    fn evaluate(
        &mut self,
        device: &str,
        selected: &[Arc<CompiledRule>],
        rate_keys: &[String],
        ts: i64,
        values: &Map<String, Json>,
        now: i64,
    ) -> (Vec<Effect>, u64) {
        let mut effects = Vec::new();
        let rules: Vec<&Arc<CompiledRule>> = selected
            .iter()
            .filter(|r| r.condition.as_ref().is_some_and(|c| c.reads_any(values)))
            .collect();
        if rules.is_empty() {
            return (effects, 0);
        }
        let rates = self.rates(device, ts, values, rate_keys);
        let fast: Vec<Option<bool>> = rules
            .iter()
            .map(|r| {
                r.condition
                    .as_ref()
                    .and_then(|c| c.eval_fast(values, &rates))
            })
            .collect();
        let holds: Vec<bool> = if fast.iter().all(Option::is_some) {
            fast.iter().map(|h| *h == Some(true)).collect()
        } else {
            with_scope(values, &rates, |scope| {
                rules
                    .iter()
                    .zip(&fast)
                    .map(|(r, f)| match f {
                        Some(h) => *h,
                        None => r.condition.as_ref().is_some_and(|c| c.eval(scope)),
                    })
                    .collect()
            })
        };
        // A rule that does not hold changes nothing unless the device has state (the usual
        // case: skip the per-rule lookups).
        let tracked = self.tracks.contains_key(device);
        for (rule, holds) in rules.iter().zip(holds.iter()) {
            if !*holds && !tracked {
                continue;
            }
            if let Some(e) = self.apply(rule, device, *holds, values, now) {
                effects.push(e);
            }
        }
        (effects, rules.len() as u64)
    }

    /// `rate(key)` for the keys the rules take it of, from the device's previous record that
    /// had the key; remembers this record for the next one.
    fn rates(
        &mut self,
        device: &str,
        ts: i64,
        values: &Map<String, Json>,
        wanted: &[String],
    ) -> Vec<(String, f64)> {
        let mut rates = Vec::new();
        if wanted.is_empty() {
            return rates;
        }
        if !self.previous.contains_key(device) {
            self.previous.insert(device.to_owned(), HashMap::new());
        }
        let Some(previous) = self.previous.get_mut(device) else {
            return rates;
        };
        for key in wanted {
            let Some(v) = values.get(key).and_then(Json::as_f64) else {
                continue;
            };
            match previous.get_mut(key) {
                Some((pts, pv)) => {
                    if ts > *pts {
                        rates.push((key.clone(), (v - *pv) * 1000.0 / (ts - *pts) as f64));
                    }
                    if ts >= *pts {
                        (*pts, *pv) = (ts, v);
                    }
                }
                None => {
                    previous.insert(key.clone(), (ts, v));
                }
            }
        }
        rates
    }

    /// Applies whether `rule` holds for `device` now.
    fn apply(
        &mut self,
        rule: &Arc<CompiledRule>,
        device: &str,
        holds: bool,
        values: &Map<String, Json>,
        now: i64,
    ) -> Option<Effect> {
        if holds {
            let due = rule.def.for_s.saturating_mul(1000) as i64;
            let t = self
                .tracks
                .entry(device.to_owned())
                .or_default()
                .entry(rule.id.clone())
                .or_default();
            let since = *t.since.get_or_insert(now);
            if t.alarm.is_none() {
                t.values = values.clone();
                if now - since >= due {
                    let alarm = new_alarm(
                        &self.id_prefix,
                        &mut self.next_id,
                        rule,
                        device,
                        values,
                        now,
                    );
                    t.alarm = Some(alarm.clone());
                    return Some(Effect::Fired {
                        rule: rule.clone(),
                        alarm,
                    });
                }
            }
            None
        } else {
            let inner = self.tracks.get_mut(device)?;
            let t = inner.remove(rule.id.as_str())?;
            if inner.is_empty() {
                self.tracks.remove(device);
            }
            t.alarm.map(|alarm| clear(rule, alarm, now))
        }
    }

    /// The timer: fires rules held for their `for_s`, and silent rules.
    pub fn tick(&mut self, now: i64) -> Vec<Effect> {
        let mut effects = Vec::new();
        let by_id: HashMap<&str, &Arc<CompiledRule>> =
            self.rules.iter().map(|r| (r.id.as_str(), r)).collect();
        let tracks = self
            .tracks
            .iter_mut()
            .flat_map(|(d, inner)| inner.iter_mut().map(move |(r, t)| (r, d, t)));
        for (rule_id, device, t) in tracks {
            let (Some(since), None) = (t.since, &t.alarm) else {
                continue;
            };
            let Some(rule) = by_id.get(rule_id.as_str()) else {
                continue;
            };
            if !rule.def.enabled || rule.def.kind != Kind::Expression {
                continue;
            }
            if now - since >= rule.def.for_s.saturating_mul(1000) as i64 {
                let alarm = new_alarm(
                    &self.id_prefix,
                    &mut self.next_id,
                    rule,
                    device,
                    &t.values,
                    now,
                );
                t.alarm = Some(alarm.clone());
                effects.push(Effect::Fired {
                    rule: (*rule).clone(),
                    alarm,
                });
            }
        }
        for rule in &self.rules {
            let Some(silent_s) = rule.def.silent_s else {
                continue;
            };
            if rule.def.kind != Kind::Silent || !rule.def.enabled {
                continue;
            }
            let limit = silent_s.saturating_mul(1000) as i64;
            for (device, last_seen) in &self.last_seen {
                if now - last_seen < limit
                    || !rule
                        .def
                        .selector
                        .matches(device, self.attributes.get(device))
                {
                    continue;
                }
                let t = self
                    .tracks
                    .entry(device.clone())
                    .or_default()
                    .entry(rule.id.clone())
                    .or_default();
                if t.alarm.is_some() {
                    continue;
                }
                let mut values = Map::new();
                values.insert("last_seen".into(), json!(last_seen));
                t.since = Some(*last_seen);
                let alarm = new_alarm(
                    &self.id_prefix,
                    &mut self.next_id,
                    rule,
                    device,
                    &values,
                    now,
                );
                t.alarm = Some(alarm.clone());
                effects.push(Effect::Fired {
                    rule: rule.clone(),
                    alarm,
                });
            }
        }
        effects
    }

    /// Acknowledges the open alarm `id`: the alarm as it is now and whether it changed, or
    /// `None` when no open alarm has that id.
    pub fn ack(&mut self, id: &str, now: i64) -> Option<(Alarm, bool)> {
        let alarm = self
            .tracks
            .values_mut()
            .flat_map(HashMap::values_mut)
            .filter_map(|t| t.alarm.as_mut())
            .find(|a| a.id == id)?;
        if alarm.state == AlarmState::Active {
            alarm.state = AlarmState::Acknowledged;
            alarm.acked_at_ms = Some(now);
            alarm.version += 1;
            Some((alarm.clone(), true))
        } else {
            Some((alarm.clone(), false))
        }
    }
}

fn new_alarm(
    prefix: &str,
    next_id: &mut u64,
    rule: &CompiledRule,
    device: &str,
    values: &Map<String, Json>,
    now: i64,
) -> Alarm {
    *next_id += 1;
    Alarm {
        id: format!("{prefix}{next_id}"),
        rule: rule.id.clone(),
        device: device.to_owned(),
        severity: rule.def.severity.as_str().to_owned(),
        state: AlarmState::Active,
        message: rule.message(),
        value: Json::Object(values.clone()),
        raised_at_ms: now,
        acked_at_ms: None,
        cleared_at_ms: None,
        version: 1,
    }
}

fn clear(rule: &Arc<CompiledRule>, mut alarm: Alarm, now: i64) -> Effect {
    alarm.state = AlarmState::Cleared;
    alarm.cleared_at_ms = Some(now);
    alarm.version += 1;
    Effect::Cleared {
        rule: rule.clone(),
        alarm,
    }
}

/// The alarm as the API shows it.
pub fn alarm_json(a: &Alarm) -> Json {
    json!({
        "id": a.id,
        "rule": a.rule,
        "device": a.device,
        "severity": a.severity,
        "state": a.state.as_str(),
        "message": a.message,
        "value": a.value,
        "raised_at": a.raised_at_ms,
        "acked_at": a.acked_at_ms,
        "cleared_at": a.cleared_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::RuleDef;

    fn rule(v: Json) -> CompiledRule {
        CompiledRule::compile(serde_json::from_value::<RuleDef>(v).unwrap()).unwrap()
    }

    fn rec(v: Json) -> Map<String, Json> {
        v.as_object().unwrap().clone()
    }

    fn kinds(effects: &[Effect]) -> Vec<(&'static str, String, String)> {
        effects
            .iter()
            .map(|e| {
                let k = match e {
                    Effect::Fired { .. } => "fired",
                    Effect::Cleared { .. } => "cleared",
                };
                (k, e.alarm().rule.clone(), e.alarm().device.clone())
            })
            .collect()
    }

    #[test]
    fn a_rule_fires_once_and_clears() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(json!({"id": "hot", "condition": "temperature > 30"})));
        let (fx, n) = e.on_record("d1", 1, &rec(json!({"temperature": 31})), 1000);
        assert_eq!(n, 1);
        assert_eq!(kinds(&fx), [("fired", "hot".into(), "d1".into())]);
        let a = fx[0].alarm().clone();
        assert_eq!(a.state, AlarmState::Active);
        assert_eq!(a.value, json!({"temperature": 31}));
        assert_eq!(a.raised_at_ms, 1000);
        let (fx, _) = e.on_record("d1", 2, &rec(json!({"temperature": 35})), 2000);
        assert!(fx.is_empty(), "one open alarm per (device, rule)");
        let (fx, n) = e.on_record("d1", 3, &rec(json!({"humidity": 3})), 2500);
        assert!(
            fx.is_empty() && n == 0,
            "a record without its keys changes nothing"
        );
        let (acked, changed) = e.ack(&a.id, 2600).unwrap();
        assert!(changed);
        assert_eq!(acked.state, AlarmState::Acknowledged);
        assert!(
            !e.ack(&a.id, 2700).unwrap().1,
            "acking twice changes nothing"
        );
        let (fx, _) = e.on_record("d1", 4, &rec(json!({"temperature": 20})), 3000);
        assert_eq!(kinds(&fx), [("cleared", "hot".into(), "d1".into())]);
        let c = fx[0].alarm();
        assert_eq!(c.id, a.id);
        assert_eq!(c.state, AlarmState::Cleared);
        assert_eq!(c.cleared_at_ms, Some(3000));
        assert_eq!(c.acked_at_ms, Some(2600));
        assert!(c.version > acked.version);
        assert!(e.ack(&a.id, 3100).is_none(), "a cleared alarm is not open");
        assert_eq!(e.open_alarms().count(), 0);
    }

    #[test]
    fn for_s_needs_the_condition_to_hold_that_long() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(
            json!({"id": "hot", "condition": "t > 30", "for_s": 300}),
        ));
        assert!(e.on_record("d1", 0, &rec(json!({"t": 31})), 0).0.is_empty());
        assert!(e.tick(299_999).is_empty(), "not yet");
        // It stops holding: the clock starts again.
        assert!(e
            .on_record("d1", 0, &rec(json!({"t": 20})), 100_000)
            .0
            .is_empty());
        assert!(e
            .on_record("d1", 0, &rec(json!({"t": 32})), 200_000)
            .0
            .is_empty());
        assert!(
            e.tick(400_000).is_empty(),
            "only 200 s since it holds again"
        );
        assert_eq!(
            kinds(&e.tick(500_000)),
            [("fired", "hot".into(), "d1".into())]
        );
        assert!(e.tick(600_000).is_empty(), "fires once");
        // A record after the time is up fires too (without waiting for the tick).
        let mut e2 = Engine::new("b-");
        e2.put_rule(rule(
            json!({"id": "hot", "condition": "t > 30", "for_s": 10}),
        ));
        assert!(e2.on_record("d", 0, &rec(json!({"t": 31})), 0).0.is_empty());
        assert_eq!(
            e2.on_record("d", 0, &rec(json!({"t": 31})), 10_000).0.len(),
            1
        );
    }

    #[test]
    fn rate_is_per_second_from_the_previous_record() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(json!({"id": "rise", "condition": "rate(t) > 0.5"})));
        assert!(
            e.on_record("d", 0, &rec(json!({"t": 20})), 0).0.is_empty(),
            "no rate yet"
        );
        assert!(
            e.on_record("d", 10_000, &rec(json!({"t": 24})), 1)
                .0
                .is_empty(),
            "0.4/s"
        );
        let (fx, _) = e.on_record("d", 12_000, &rec(json!({"t": 26})), 2);
        assert_eq!(kinds(&fx), [("fired", "rise".into(), "d".into())], "1/s");
        let (fx, _) = e.on_record("d", 22_000, &rec(json!({"t": 26})), 3);
        assert_eq!(kinds(&fx), [("cleared", "rise".into(), "d".into())], "0/s");
        // Another device has its own history.
        assert!(e
            .on_record("e", 22_000, &rec(json!({"t": 99})), 4)
            .0
            .is_empty());
    }

    #[test]
    fn selectors_pick_devices() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(
            json!({"id": "g", "condition": "t > 1", "selector": {"id_glob": "demo-*"}}),
        ));
        e.put_rule(rule(
            json!({"id": "l", "condition": "t > 1", "selector": {"devices": ["x"]}}),
        ));
        e.put_rule(rule(
            json!({"id": "a", "condition": "t > 1", "selector": {"attributes": {"site": "a"}}}),
        ));
        e.set_attributes("x", json!({"site": "a"}));
        let fired = |fx: Vec<Effect>| {
            let mut r: Vec<String> = fx.iter().map(|e| e.alarm().rule.clone()).collect();
            r.sort();
            r
        };
        assert_eq!(
            fired(e.on_record("demo-1", 0, &rec(json!({"t": 2})), 0).0),
            ["g"]
        );
        assert_eq!(
            fired(e.on_record("x", 0, &rec(json!({"t": 2})), 0).0),
            ["a", "l"]
        );
        assert!(e
            .on_record("other", 0, &rec(json!({"t": 2})), 0)
            .0
            .is_empty());
        e.put_rule(rule(
            json!({"id": "off", "condition": "t > 1", "enabled": false}),
        ));
        assert!(
            e.on_record("y", 0, &rec(json!({"t": 2})), 0).0.is_empty(),
            "disabled"
        );
    }

    #[test]
    fn silent_rules_fire_on_silence_and_clear_when_heard() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(
            json!({"id": "quiet", "kind": "silent", "silent_s": 60}),
        ));
        e.seen("d1", 0);
        e.set_last_seen("d2", 50_000);
        assert!(e.tick(59_999).is_empty());
        assert_eq!(
            kinds(&e.tick(60_000)),
            [("fired", "quiet".into(), "d1".into())]
        );
        assert!(e.tick(61_000).is_empty(), "once");
        assert_eq!(
            kinds(&e.tick(110_000)),
            [("fired", "quiet".into(), "d2".into())]
        );
        let fx = e.on_record("d1", 0, &rec(json!({"t": 1})), 120_000).0;
        assert_eq!(kinds(&fx), [("cleared", "quiet".into(), "d1".into())]);
        assert!(e.tick(150_000).is_empty(), "heard from at 120 s");
    }

    #[test]
    fn removing_a_rule_clears_its_alarms_and_restore_reopens() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(json!({"id": "hot", "condition": "t > 30"})));
        let fx = e.on_record("d1", 0, &rec(json!({"t": 31})), 5).0;
        let alarm = fx[0].alarm().clone();
        let (found, fx) = e.remove_rule("hot", 6);
        assert!(found);
        assert_eq!(kinds(&fx), [("cleared", "hot".into(), "d1".into())]);
        assert!(!e.remove_rule("hot", 7).0);

        let mut e = Engine::new("b-");
        e.put_rule(rule(json!({"id": "hot", "condition": "t > 30"})));
        e.restore_alarm(alarm.clone());
        assert_eq!(e.open_alarms().count(), 1);
        assert!(
            e.on_record("d1", 0, &rec(json!({"t": 40})), 8).0.is_empty(),
            "still open"
        );
        let fx = e.on_record("d1", 0, &rec(json!({"t": 1})), 9).0;
        assert_eq!(fx[0].alarm().id, alarm.id);
        assert_eq!(alarm_json(fx[0].alarm())["state"], "cleared");
    }
}
