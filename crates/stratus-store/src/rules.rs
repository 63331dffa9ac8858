//! Rules (stored as the JSON definition the API accepted) and alarms (their full history),
//! behind the [`RuleStore`] trait.
//!
//! The store does not interpret a rule: the server validates and compiles the definition and
//! keeps it here verbatim, so that new rule features need no schema change. Alarms are typed
//! rows; every change of an alarm carries a `version` that grows by one, and
//! [`Write::PutAlarm`] only replaces a stored alarm with a newer version, so writes of one
//! alarm that reach the store out of order never move it back in time.

use serde_json::Value as Json;

use crate::write::{Write, WriteBackend};
use crate::{check_id, check_text, StoreError};

/// Longest accepted rule definition, in bytes of JSON.
pub const MAX_RULE_LEN: usize = 64 * 1024;

/// Longest accepted alarm message, in bytes.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// A rule as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRule {
    /// Id, `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// The definition (a JSON object, as the API shows it).
    pub definition: Json,
    /// When it was first stored, Unix epoch milliseconds.
    pub created_at_ms: i64,
}

impl StoredRule {
    /// Checks the id and the size and shape of the definition.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_id("rule", &self.id)?;
        if !self.definition.is_object() {
            return Err(StoreError::Invalid(
                "a rule definition must be a JSON object".into(),
            ));
        }
        let len = self.definition.to_string().len();
        if len > MAX_RULE_LEN {
            return Err(StoreError::Invalid(format!(
                "a rule definition must be at most {MAX_RULE_LEN} bytes of JSON (got {len})"
            )));
        }
        Ok(())
    }
}

/// Where an alarm is in its life: active → acknowledged → cleared, or active → cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlarmState {
    /// Raised, nobody acknowledged it yet.
    Active,
    /// Somebody acknowledged it; the condition still holds.
    Acknowledged,
    /// The condition stopped holding (final).
    Cleared,
}

impl AlarmState {
    /// `active`, `acknowledged` or `cleared`.
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Active => "active",
            AlarmState::Acknowledged => "acknowledged",
            AlarmState::Cleared => "cleared",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<AlarmState> {
        match s {
            "active" => Some(AlarmState::Active),
            "acknowledged" => Some(AlarmState::Acknowledged),
            "cleared" => Some(AlarmState::Cleared),
            _ => None,
        }
    }

    /// Whether the alarm is still open (not cleared).
    pub fn is_open(self) -> bool {
        self != AlarmState::Cleared
    }
}

/// One alarm.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    /// Id, `[A-Za-z0-9._-]{1,64}`.
    pub id: String,
    /// The rule that raised it.
    pub rule: String,
    /// The device it is about.
    pub device: String,
    /// `critical`, `major`, `minor`, `warning` or `info`.
    pub severity: String,
    /// Where it is in its life.
    pub state: AlarmState,
    /// Human-readable text.
    pub message: String,
    /// The record values that raised it (a JSON object).
    pub value: Json,
    /// When it was raised, Unix epoch milliseconds.
    pub raised_at_ms: i64,
    /// When it was acknowledged, if it was.
    pub acked_at_ms: Option<i64>,
    /// When it cleared, if it did.
    pub cleared_at_ms: Option<i64>,
    /// Grows by one with every change (1 when raised).
    pub version: u64,
}

impl Alarm {
    /// Checks ids and texts.
    pub fn validate(&self) -> Result<(), StoreError> {
        check_id("alarm", &self.id)?;
        check_id("rule", &self.rule)?;
        check_id("device", &self.device)?;
        check_text("alarm severity", &self.severity, 32)?;
        if !self.message.is_empty() {
            check_text("alarm message", &self.message, MAX_MESSAGE_LEN)?;
        }
        Ok(())
    }
}

/// Which alarms to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlarmFilter {
    /// Every alarm.
    #[default]
    Any,
    /// Active or acknowledged.
    Open,
    /// In exactly this state.
    State(AlarmState),
}

/// An alarm listing: newest (by `raised_at_ms`) first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlarmQuery {
    /// Which states.
    pub filter: AlarmFilter,
    /// Only this device's.
    pub device: Option<String>,
    /// Only this rule's.
    pub rule: Option<String>,
    /// At most this many.
    pub limit: usize,
}

/// Rules and alarms. Writes go through [`WriteBackend`] ([`Write::PutRule`],
/// [`Write::DeleteRule`], [`Write::PutAlarm`]); the provided methods are one write each.
pub trait RuleStore: WriteBackend {
    /// Every rule, by id.
    fn rules(&self) -> Result<Vec<StoredRule>, StoreError>;

    /// One rule.
    fn rule(&self, id: &str) -> Result<Option<StoredRule>, StoreError>;

    /// Alarms matching `query`, newest first.
    fn alarms(&self, query: &AlarmQuery) -> Result<Vec<Alarm>, StoreError>;

    /// One alarm.
    fn alarm(&self, id: &str) -> Result<Option<Alarm>, StoreError>;

    /// Creates or replaces a rule (keeping the first `created_at_ms`).
    fn put_rule(&self, rule: StoredRule) -> Result<(), StoreError> {
        self.write_one(Write::PutRule(rule))?.into_done()
    }

    /// Deletes a rule ([`StoreError::NotFound`] when there is none); its alarms stay.
    fn delete_rule(&self, id: &str) -> Result<(), StoreError> {
        self.write_one(Write::DeleteRule { id: id.into() })?
            .into_done()
    }

    /// Stores an alarm unless a version at least as new is stored; whether it was stored.
    fn put_alarm(&self, alarm: Alarm) -> Result<bool, StoreError> {
        Ok(self.write_one(Write::PutAlarm(alarm))?.into_count()? == 1)
    }
}
