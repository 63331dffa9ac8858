//! The sans-IO rule state machine: given rules, records and the time, it decides when a rule
//! fires and when it stops holding for a device, and says so as [`Effect`]s. Time is always
//! passed in (epoch ms), so `for_s` and silent rules are tested on virtual time.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Map, Value as Json};
use stratus_store::{Alarm, AlarmState};

use super::batch::{Batch, Record};
use super::condition::with_record_scope;
use super::index::{Index, Lookup};
use super::{CompiledRule, Kind};
use crate::ingest::Value;

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
    /// The values that last made it hold (shared by the rules that held for one record).
    values: Arc<Map<String, Json>>,
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
    /// Each device's expression rules and their index, valid while `generation` (bumped by
    /// any change of rules) is unchanged.
    selections: HashMap<String, Selection>,
    /// The indexes built for `generation`, by the identity of their rules.
    indexes: (u64, HashMap<Vec<usize>, Arc<Index>>),
    generation: u64,
}

/// A device's state of one rule of its index during a message.
struct Entry {
    pos: u32,
    id: String,
    track: Track,
    /// The last record of the message that made the rule hold (its values become the
    /// track's at the end of the message), or [`Tracks::NONE`].
    held: u32,
}

/// A device's state of the rules of its index during one message, and where each rule
/// position's entry is (`at` is filled in at the first entry: a message no rule holds for
/// allocates nothing here).
struct Tracks {
    list: Vec<Entry>,
    at: Vec<u32>,
    rules: usize,
}

impl Tracks {
    const NONE: u32 = u32::MAX;

    fn new(rules: usize) -> Tracks {
        Tracks {
            list: Vec::new(),
            at: Vec::new(),
            rules,
        }
    }

    fn insert(&mut self, pos: u32, id: String, track: Track) {
        if self.at.is_empty() {
            self.at = vec![Tracks::NONE; self.rules];
        }
        if let Some(at) = self.at.get_mut(pos as usize) {
            *at = self.list.len() as u32;
            self.list.push(Entry {
                pos,
                id,
                track,
                held: Tracks::NONE,
            });
        }
    }

    fn get_or_insert(&mut self, pos: u32, rule: &CompiledRule) -> Option<&mut Entry> {
        let i = match self.at.get(pos as usize) {
            Some(i) => *i,
            None if (pos as usize) < self.rules => Tracks::NONE,
            None => return None,
        };
        if i == Tracks::NONE {
            self.insert(pos, rule.id.clone(), Track::default());
            return self.list.last_mut();
        }
        self.list.get_mut(i as usize)
    }

    fn remove(&mut self, pos: u32) -> Option<Track> {
        let at = self.at.get_mut(pos as usize)?;
        let i = std::mem::replace(at, Tracks::NONE) as usize;
        if i >= self.list.len() {
            return None;
        }
        let removed = self.list.swap_remove(i);
        if let Some(moved) = self.list.get(i) {
            if let Some(at) = self.at.get_mut(moved.pos as usize) {
                *at = i as u32;
            }
        }
        Some(removed.track)
    }

    /// Gives each rule that held during the message the values of the last record that
    /// made it hold (one map per such record).
    fn keep_values(&mut self, batch: &Batch) {
        let mut wanted: Vec<u32> = self
            .list
            .iter()
            .filter(|e| e.held != Tracks::NONE)
            .map(|e| e.held)
            .collect();
        if wanted.is_empty() {
            return;
        }
        wanted.sort_unstable();
        wanted.dedup();
        let mut maps: Vec<(u32, Arc<Map<String, Json>>)> = Vec::with_capacity(wanted.len());
        let mut next = wanted.iter().peekable();
        for (i, r) in batch.records().enumerate() {
            let Some(&&w) = next.peek() else { break };
            if w == i as u32 {
                maps.push((w, Arc::new(r.to_map())));
                next.next();
            }
        }
        for e in &mut self.list {
            if let Ok(k) = maps.binary_search_by_key(&e.held, |m| m.0) {
                if let Some((_, m)) = maps.get(k) {
                    e.track.values = m.clone();
                }
            }
        }
    }
}

/// Whether bit `pos` of a rule bit set is set.
fn bit(bits: &[u64], pos: u32) -> bool {
    bits.get(pos as usize / 64)
        .is_some_and(|w| w & (1 << (pos % 64)) != 0)
}

/// The expression rules that select a device.
#[derive(Debug)]
struct Selection {
    generation: u64,
    index: Arc<Index>,
}

/// A record as the fast trees of an [`Index`] read it.
struct View<'a> {
    record: &'a Record<'a>,
    /// Slot of each key of the message.
    slots: &'a [Option<u32>],
    /// `(slot, rate)` of the record.
    rates: &'a [(u32, f64)],
}

impl Lookup for View<'_> {
    fn value(&self, slot: u32) -> Option<&Value> {
        self.record
            .values
            .iter()
            .find(|(k, _)| self.slots.get(*k as usize).copied().flatten() == Some(slot))
            .map(|(_, v)| v)
    }

    fn rate(&self, slot: u32) -> Option<f64> {
        self.rates.iter().find(|(s, _)| *s == slot).map(|(_, r)| *r)
    }
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
            indexes: (0, HashMap::new()),
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
        self.on_records(device, &Batch::from_maps([(ts, values)]), now)
    }

    /// The stored records of one message of `device`, in order: the device's rules and
    /// their index are looked up once, then each record evaluates only the rules that can
    /// hold for it (see [`super::index`]) and those with state for the device. Returns the
    /// effects and the number of (rule, record) pairs where the record has a key the rule
    /// reads (the rule's state follows the record).
    pub fn on_records(&mut self, device: &str, batch: &Batch, now: i64) -> (Vec<Effect>, u64) {
        let mut effects = self.seen(device, now);
        if batch.is_empty() {
            return (effects, 0);
        }
        let index = self.selection(device);
        if index.rules().is_empty() {
            return (effects, 0);
        }
        // Per key of the message: its slot in the index, and whether rules take its rate.
        let slots: Vec<Option<u32>> = batch.keys().iter().map(|k| index.slot(k)).collect();
        if slots.iter().all(Option::is_none) {
            return (effects, 0);
        }
        // The previous (ts, value) of each rated key, kept here for the message and
        // remembered at the end.
        let mut previous: Vec<Option<(i64, f64)>> = vec![None; slots.len()];
        let rated: Vec<bool> = slots
            .iter()
            .map(|s| s.is_some_and(|s| index.rated(s)))
            .collect();
        if rated.iter().any(|r| *r) {
            if let Some(known) = self.previous.get(device) {
                for ((p, key), r) in previous.iter_mut().zip(batch.keys()).zip(&rated) {
                    if *r {
                        *p = known.get(key).copied();
                    }
                }
            }
        }
        let mut evaluations = 0;
        let mut candidates: Vec<u32> = Vec::new();
        let mut marked: Vec<u64> = vec![0; index.words()];
        let mut rates: Vec<(u32, f64)> = Vec::new();
        let mut read: Vec<u64> = vec![0; index.words()];
        // The device's state of the indexed rules, taken out for the message (no lookup by
        // device and rule id per record), put back at the end.
        let (device_key, mut others) = match self.tracks.remove_entry(device) {
            Some((k, m)) => (Some(k), m),
            None => (None, HashMap::new()),
        };
        let mut tracks = Tracks::new(index.rules().len());
        if !others.is_empty() {
            for (id, t) in std::mem::take(&mut others) {
                match index.position(&id) {
                    Some(pos) => tracks.insert(pos, id, t),
                    None => {
                        others.insert(id, t);
                    }
                }
            }
        }
        for (at, record) in batch.records().enumerate() {
            candidates.clear();
            rates.clear();
            let mut slotted = 0;
            let mut last_slot = 0;
            for (k, v) in record.values {
                let Some(slot) = slots.get(*k as usize).copied().flatten() else {
                    continue;
                };
                slotted += 1;
                last_slot = slot;
                index.candidates_for_value(slot, v, &mut candidates);
                if !rated.get(*k as usize).copied().unwrap_or(false) {
                    continue;
                }
                let (Value::Number(n), Some(p)) = (v, previous.get_mut(*k as usize)) else {
                    continue;
                };
                match p {
                    Some((pts, pv)) => {
                        if record.ts > *pts {
                            let r = (n - *pv) * 1000.0 / (record.ts - *pts) as f64;
                            rates.push((slot, r));
                            index.candidates_for_rate(slot, r, &mut candidates);
                        }
                        if record.ts >= *pts {
                            (*pts, *pv) = (record.ts, *n);
                        }
                    }
                    None => *p = Some((record.ts, *n)),
                }
            }
            if slotted == 0 {
                continue;
            }
            // The rules with state for the device follow every record they read.
            if slotted == 1 && tracks.list.is_empty() {
                evaluations += index.reader_count(last_slot);
            } else {
                read.iter_mut().for_each(|w| *w = 0);
                for (k, _) in record.values {
                    if let Some(slot) = slots.get(*k as usize).copied().flatten() {
                        index.add_readers(slot, &mut read);
                    }
                }
                evaluations += read.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                for e in &tracks.list {
                    if bit(&read, e.pos) {
                        candidates.push(e.pos);
                    }
                }
            }
            if candidates.is_empty() {
                continue;
            }
            // In rule order, once each.
            for &pos in &candidates {
                if let Some(w) = marked.get_mut(pos as usize / 64) {
                    *w |= 1 << (pos % 64);
                }
            }
            candidates.clear();
            for (i, w) in marked.iter_mut().enumerate() {
                while *w != 0 {
                    candidates.push(i as u32 * 64 + w.trailing_zeros());
                    *w &= *w - 1;
                }
            }
            let view = View {
                record: &record,
                slots: &slots,
                rates: &rates,
            };
            let mut cel: Option<Vec<bool>> = None;
            let mut values: Option<Arc<Map<String, Json>>> = None;
            for (i, &pos) in candidates.iter().enumerate() {
                let Some(rule) = index.rules().get(pos as usize) else {
                    continue;
                };
                let holds = match index.tree_of(pos) {
                    Some(tree) => tree.eval(&view) == Some(true),
                    None => {
                        // Every CEL candidate of the record in one scope.
                        let all = cel.get_or_insert_with(|| {
                            with_record_scope(
                                record.iter(),
                                rates.iter().map(|(s, r)| (index.name(*s), *r)),
                                |scope| {
                                    candidates
                                        .iter()
                                        .map(|&p| {
                                            index.tree_of(p).is_none()
                                                && index
                                                    .rules()
                                                    .get(p as usize)
                                                    .and_then(|r| r.condition.as_ref())
                                                    .is_some_and(|c| c.eval(scope))
                                        })
                                        .collect()
                                },
                            )
                        });
                        all.get(i).copied().unwrap_or(false)
                    }
                };
                let effect = if holds {
                    let Some(e) = tracks.get_or_insert(pos, rule) else {
                        continue;
                    };
                    let t = &mut e.track;
                    let since = *t.since.get_or_insert(now);
                    let due = rule.def.for_s.saturating_mul(1000) as i64;
                    if t.alarm.is_some() {
                        None
                    } else if now - since >= due {
                        let v = values
                            .get_or_insert_with(|| Arc::new(record.to_map()))
                            .clone();
                        let alarm =
                            new_alarm(&self.id_prefix, &mut self.next_id, rule, device, &v, now);
                        t.values = v;
                        t.alarm = Some(alarm.clone());
                        e.held = Tracks::NONE;
                        Some(Effect::Fired {
                            rule: rule.clone(),
                            alarm,
                        })
                    } else {
                        // Waiting for `for_s`: the values are kept at the end of the message.
                        e.held = at as u32;
                        None
                    }
                } else {
                    tracks
                        .remove(pos)
                        .and_then(|t| t.alarm)
                        .map(|alarm| clear(rule, alarm, now))
                };
                effects.extend(effect);
            }
        }
        tracks.keep_values(batch);
        for e in tracks.list {
            others.insert(e.id, e.track);
        }
        if !others.is_empty() {
            self.tracks
                .insert(device_key.unwrap_or_else(|| device.to_owned()), others);
        }
        if rated.iter().any(|r| *r) {
            let known = match self.previous.get_mut(device) {
                Some(k) => k,
                None => self.previous.entry(device.to_owned()).or_default(),
            };
            for ((p, key), r) in previous.iter().zip(batch.keys()).zip(&rated) {
                let (Some(p), true) = (p, r) else { continue };
                match known.get_mut(key) {
                    Some(k) => *k = *p,
                    None => {
                        known.insert(key.clone(), *p);
                    }
                }
            }
        }
        (effects, evaluations)
    }

    /// The index of the device's expression rules (cached per device, and shared by the
    /// devices that select the same rules).
    fn selection(&mut self, device: &str) -> Arc<Index> {
        if let Some(s) = self.selections.get(device) {
            if s.generation == self.generation {
                return s.index.clone();
            }
        }
        if self.indexes.0 != self.generation {
            self.indexes = (self.generation, HashMap::new());
        }
        let rules: Vec<Arc<CompiledRule>> = self
            .rules
            .iter()
            .filter(|r| r.condition.is_some() && self.selected(r, device))
            .cloned()
            .collect();
        let identity: Vec<usize> = rules.iter().map(|r| Arc::as_ptr(r) as usize).collect();
        let index = match self.indexes.1.get(&identity) {
            Some(i) => i.clone(),
            None => {
                let i = Arc::new(Index::new(rules.into()));
                self.indexes.1.insert(identity, i.clone());
                i
            }
        };
        self.selections.insert(
            device.to_owned(),
            Selection {
                generation: self.generation,
                index: index.clone(),
            },
        );
        index
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
        assert_eq!(
            a.value,
            json!({"temperature": 31.0}),
            "record numbers are doubles"
        );
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

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[self.below(from.len())]
        }
    }

    /// A random condition: mostly the fast shapes, sometimes one CEL must evaluate.
    fn random_condition(g: &mut Rng, depth: u32) -> String {
        let keys = ["a", "b", "c"];
        let ops = ["<", "<=", ">", ">=", "==", "!="];
        let literals = [
            "-1", "0", "-0.0", "0.5", "1", "2", "3u", "2.0", "-2", "1e12",
        ];
        if depth == 0 || g.below(3) == 0 {
            return match g.below(12) {
                0 => format!(
                    "rate({}) {} {}",
                    g.pick(&keys),
                    g.pick(&ops),
                    g.pick(&literals)
                ),
                1 => format!("{} {} {}", g.pick(&literals), g.pick(&ops), g.pick(&keys)),
                2 => format!("{} + 1 > {}", g.pick(&keys), g.pick(&literals)),
                3 => format!("{} {} {}", g.pick(&keys), g.pick(&ops), g.pick(&keys)),
                4 => format!("m {} 'x'", g.pick(&["==", "!="])),
                5 => format!("{} in [1, 2]", g.pick(&keys)),
                6 => format!("{} == true", g.pick(&keys)),
                _ => format!("{} {} {}", g.pick(&keys), g.pick(&ops), g.pick(&literals)),
            };
        }
        match g.below(3) {
            0 => format!(
                "({} && {})",
                random_condition(g, depth - 1),
                random_condition(g, depth - 1)
            ),
            1 => format!(
                "({} || {})",
                random_condition(g, depth - 1),
                random_condition(g, depth - 1)
            ),
            _ => format!("!({})", random_condition(g, depth - 1)),
        }
    }

    fn random_record(g: &mut Rng) -> Map<String, Json> {
        let mut m = Map::new();
        for k in ["a", "b", "c", "m"] {
            if g.below(5) < 3 {
                let v = match g.below(10) {
                    0 => json!(true),
                    1 => json!("x"),
                    2 => json!(-0.0),
                    _ => json!([-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 2.5][g.below(7)]),
                };
                m.insert(k.to_owned(), v);
            }
        }
        m
    }

    /// The engine (index, fast trees, CEL for the rest) against evaluating every rule with
    /// CEL on every record, over random rules, records, timestamps and message sizes.
    #[test]
    fn the_index_and_fast_path_agree_with_cel_on_random_rules_and_records() {
        use crate::rules::condition::with_scope;
        let mut g = Rng(0x9e37_79b9_7f4a_7c15);
        let mut fast_rules = 0;
        for round in 0..40 {
            let mut e = Engine::new("a-");
            let mut conditions = Vec::new();
            // Past 64 rules the rule bit sets take two words.
            for i in 0..[30, 70][round % 2] {
                let source = random_condition(&mut g, 3);
                let for_s = [0, 0, 1, 2][i % 4];
                let r =
                    rule(json!({"id": format!("r{i:02}"), "condition": source, "for_s": for_s}));
                fast_rules += usize::from(r.condition.as_ref().unwrap().is_fast());
                conditions.push((
                    format!("r{i:02}"),
                    r.condition.clone().unwrap(),
                    for_s * 1000,
                ));
                e.put_rule(r);
            }
            let mut rate_keys: Vec<String> = conditions
                .iter()
                .flat_map(|(_, c, _)| c.rate_keys().iter().cloned())
                .collect();
            rate_keys.sort();
            rate_keys.dedup();
            // The reference: open (device, rule) pairs and each device's previous values.
            // (device, rule) → since when it holds, and whether it fired.
            let mut state: HashMap<(String, String), (i64, bool)> = HashMap::new();
            let mut previous: HashMap<(String, String), (i64, f64)> = HashMap::new();
            let mut ts = 1_000i64;
            for message in 0..30 {
                let now = message * 700;
                let device = ["d1", "d2"][g.below(2)].to_owned();
                let n = 1 + g.below(4);
                let mut records = Vec::new();
                for _ in 0..n {
                    ts += [0, 500, 1000, -300][g.below(4)];
                    records.push((ts, random_record(&mut g)));
                }
                let mut expected_evaluations = 0;
                for (ts, values) in &records {
                    let mut rates = Vec::new();
                    for key in &rate_keys {
                        let Some(v) = values.get(key).and_then(Json::as_f64) else {
                            continue;
                        };
                        let slot = (device.clone(), key.clone());
                        match previous.get_mut(&slot) {
                            Some((pts, pv)) => {
                                if *ts > *pts {
                                    rates.push((
                                        key.clone(),
                                        (v - *pv) * 1000.0 / (ts - *pts) as f64,
                                    ));
                                }
                                if *ts >= *pts {
                                    (*pts, *pv) = (*ts, v);
                                }
                            }
                            None => {
                                previous.insert(slot, (*ts, v));
                            }
                        }
                    }
                    for (id, c, due) in &conditions {
                        if !c.reads_any(values) {
                            continue;
                        }
                        expected_evaluations += 1;
                        let holds = with_scope(values, &rates, |s| c.eval(s));
                        if let Some(fast) = c.eval_fast(values, &rates) {
                            assert_eq!(fast, holds, "{} on {values:?} with {rates:?}", c.source());
                        }
                        let pair = (device.clone(), id.clone());
                        if holds {
                            let (since, fired) = state.entry(pair).or_insert((now, false));
                            *fired |= now - *since >= *due;
                        } else {
                            state.remove(&pair);
                        }
                    }
                }
                let batch = Batch::from_maps(records.iter().map(|(t, v)| (*t, v)));
                let (_, evaluations) = e.on_records(&device, &batch, now);
                let open: std::collections::BTreeSet<(String, String)> = state
                    .iter()
                    .filter(|(_, (_, fired))| *fired)
                    .map(|(pair, _)| pair.clone())
                    .collect();
                let got: std::collections::BTreeSet<(String, String)> = e
                    .open_alarms()
                    .map(|a| (a.device.clone(), a.rule.clone()))
                    .collect();
                assert_eq!(
                    got,
                    open,
                    "round {round} message {message}: {records:?}\nrules {:?}",
                    conditions
                        .iter()
                        .map(|(i, c, _)| (i, c.source()))
                        .collect::<Vec<_>>()
                );
                assert_eq!(evaluations, expected_evaluations);
            }
        }
        assert!(
            fast_rules > 300,
            "the fast path was exercised: {fast_rules}"
        );
    }

    #[test]
    fn a_rule_fired_by_the_timer_reports_the_last_record_that_made_it_hold() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(
            json!({"id": "hot", "condition": "t > 30", "for_s": 10}),
        ));
        e.put_rule(rule(
            json!({"id": "wet", "condition": "u > 1", "for_s": 10}),
        ));
        let records: Vec<(i64, Map<String, Json>)> = [
            json!({"t": 31, "u": 2, "n": 0}),
            json!({"t": 35, "n": 1}),
            json!({"u": 3, "n": 2}),
            json!({"n": 3}),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, v)| (i as i64, rec(v)))
        .collect();
        let batch = Batch::from_maps(records.iter().map(|(t, v)| (*t, v)));
        assert!(e.on_records("d", &batch, 0).0.is_empty());
        let mut fired: Vec<(String, Json)> = e
            .tick(10_000)
            .iter()
            .map(|f| (f.alarm().rule.clone(), f.alarm().value.clone()))
            .collect();
        fired.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            fired,
            [
                ("hot".to_string(), json!({"t": 35.0, "n": 1.0})),
                ("wet".to_string(), json!({"u": 3.0, "n": 2.0})),
            ]
        );
    }

    #[test]
    fn the_state_of_a_rule_that_no_longer_selects_the_device_is_kept() {
        let mut e = Engine::new("a-");
        e.put_rule(rule(
            json!({"id": "a", "condition": "t > 1", "selector": {"attributes": {"site": "x"}}}),
        ));
        e.put_rule(rule(json!({"id": "b", "condition": "t > 5"})));
        e.set_attributes("d", json!({"site": "x"}));
        let fx = e.on_record("d", 0, &rec(json!({"t": 2})), 1).0;
        assert_eq!(kinds(&fx), [("fired", "a".into(), "d".into())]);
        e.set_attributes("d", json!({"site": "y"}));
        let fx = e.on_record("d", 1, &rec(json!({"t": 6})), 2).0;
        assert_eq!(kinds(&fx), [("fired", "b".into(), "d".into())]);
        assert_eq!(
            e.on_record("d", 2, &rec(json!({"t": 0})), 3).0.len(),
            1,
            "b clears"
        );
        assert_eq!(
            e.open_alarms().count(),
            1,
            "a is not evaluated but stays open"
        );
        e.set_attributes("d", json!({"site": "x"}));
        let fx = e.on_record("d", 3, &rec(json!({"t": 0})), 4).0;
        assert_eq!(kinds(&fx), [("cleared", "a".into(), "d".into())]);
        assert_eq!(e.open_alarms().count(), 0);
    }

    #[test]
    fn rules_that_cannot_hold_are_not_evaluated_but_still_counted() {
        let mut e = Engine::new("a-");
        for i in 0..100 {
            e.put_rule(rule(json!({
                "id": format!("r{i:03}"),
                "condition": format!("t > {} || rate(t) > 1e12", 100 + i),
            })));
        }
        let records: Vec<(i64, Map<String, Json>)> = (0..1000)
            .map(|i| (i, rec(json!({"t": (i % 90) as f64}))))
            .collect();
        let batch = Batch::from_maps(records.iter().map(|(t, v)| (*t, v)));
        let (fx, n) = e.on_records("d", &batch, 1);
        assert!(fx.is_empty());
        assert_eq!(n, 100_000, "every rule reads every record");
        // One record over the lowest thresholds fires exactly those rules.
        let (fx, _) = e.on_record("d", 2000, &rec(json!({"t": 102.5})), 2);
        let mut fired: Vec<String> = fx.iter().map(|f| f.alarm().rule.clone()).collect();
        fired.sort();
        assert_eq!(fired, ["r000", "r001", "r002"]);
        // The tracked rules clear on the next record below them, whatever else it holds.
        let (fx, _) = e.on_record("d", 3000, &rec(json!({"t": 101, "u": 1})), 3);
        assert_eq!(
            kinds(&fx),
            [
                ("cleared", "r001".into(), "d".into()),
                ("cleared", "r002".into(), "d".into())
            ]
        );
    }
}
