//! The rule and alarm checks: rules round-trip and delete, alarms keep their newest version
//! and list newest first with the state, device and rule filters.

use serde_json::json;

use super::expect_err;
use crate::rules::{Alarm, AlarmFilter, AlarmQuery, AlarmState, RuleStore, StoredRule};
use crate::StoreError;

fn alarm(id: &str, device: &str, raised_at_ms: i64) -> Alarm {
    Alarm {
        id: id.into(),
        rule: "hot".into(),
        device: device.into(),
        severity: "major".into(),
        state: AlarmState::Active,
        message: "temperature > 30".into(),
        value: json!({ "temperature": 31.5 }),
        raised_at_ms,
        acked_at_ms: None,
        cleared_at_ms: None,
        version: 1,
    }
}

fn query(filter: AlarmFilter, device: Option<&str>) -> AlarmQuery {
    AlarmQuery {
        filter,
        device: device.map(Into::into),
        rule: None,
        limit: 100,
    }
}

fn ids(alarms: &[Alarm]) -> Vec<&str> {
    alarms.iter().map(|a| a.id.as_str()).collect()
}

/// Runs the rule and alarm checks. No rule or alarm may exist at the start; alarms are left
/// behind (they are history).
pub fn run_rules<S: RuleStore>(open: impl Fn() -> S) {
    let s = open();
    assert!(
        s.rules().expect("rules").is_empty(),
        "no rules at the start"
    );
    let rule = StoredRule {
        id: "hot".into(),
        definition: json!({ "id": "hot", "condition": "temperature > 30" }),
        created_at_ms: 1_700_000_000_000,
    };
    s.put_rule(rule.clone()).expect("put rule");
    let replaced = StoredRule {
        definition: json!({ "id": "hot", "condition": "temperature > 35" }),
        created_at_ms: 1_800_000_000_000,
        ..rule.clone()
    };
    s.put_rule(replaced.clone()).expect("replace rule");
    let got = open()
        .rule("hot")
        .expect("rule")
        .expect("the rule is stored");
    assert_eq!(
        got.definition, replaced.definition,
        "a put replaces the definition"
    );
    assert_eq!(
        got.created_at_ms, rule.created_at_ms,
        "but keeps the creation time"
    );
    expect_err(
        s.put_rule(StoredRule {
            id: "bad id".into(),
            ..rule.clone()
        }),
        "a rule id with a space",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    expect_err(
        s.put_rule(StoredRule {
            definition: json!([1]),
            ..rule.clone()
        }),
        "a definition that is not an object",
        |e| matches!(e, StoreError::Invalid(_)),
    );
    assert_eq!(open().rules().expect("rules").len(), 1);

    // Alarms: newest first, filters, versions only move forward.
    for (i, (id, device)) in [("a1", "d1"), ("a2", "d2"), ("a3", "d1")]
        .iter()
        .enumerate()
    {
        assert!(s
            .put_alarm(alarm(id, device, 1_700_000_000_000 + i as i64))
            .expect("put alarm"));
    }
    let mut acked = alarm("a1", "d1", 1_700_000_000_000);
    acked.state = AlarmState::Acknowledged;
    acked.acked_at_ms = Some(1_700_000_000_500);
    acked.version = 2;
    assert!(s.put_alarm(acked.clone()).expect("ack"));
    let stale = alarm("a1", "d1", 1_700_000_000_000);
    assert!(
        !s.put_alarm(stale).expect("stale put"),
        "an older version is not stored"
    );
    assert_eq!(open().alarm("a1").expect("alarm"), Some(acked.clone()));
    let mut cleared = alarm("a2", "d2", 1_700_000_000_001);
    cleared.state = AlarmState::Cleared;
    cleared.cleared_at_ms = Some(1_700_000_001_000);
    cleared.version = 2;
    assert!(s.put_alarm(cleared).expect("clear"));

    let s = open();
    assert_eq!(
        ids(&s.alarms(&query(AlarmFilter::Any, None)).expect("all")),
        ["a3", "a2", "a1"]
    );
    assert_eq!(
        ids(&s.alarms(&query(AlarmFilter::Open, None)).expect("open")),
        ["a3", "a1"]
    );
    assert_eq!(
        ids(&s
            .alarms(&query(AlarmFilter::State(AlarmState::Active), None))
            .expect("active")),
        ["a3"]
    );
    assert_eq!(
        ids(&s
            .alarms(&query(AlarmFilter::State(AlarmState::Cleared), None))
            .expect("cleared")),
        ["a2"]
    );
    assert_eq!(
        ids(&s.alarms(&query(AlarmFilter::Any, Some("d1"))).expect("d1")),
        ["a3", "a1"]
    );
    let mut limited = query(AlarmFilter::Any, None);
    limited.limit = 1;
    assert_eq!(ids(&s.alarms(&limited).expect("limit")), ["a3"]);
    let mut by_rule = query(AlarmFilter::Any, None);
    by_rule.rule = Some("other".into());
    assert!(s.alarms(&by_rule).expect("by rule").is_empty());
    assert_eq!(s.alarm("nope").expect("missing alarm"), None);
    expect_err(
        s.put_alarm(alarm("bad id", "d1", 0)),
        "an alarm id with a space",
        |e| matches!(e, StoreError::Invalid(_)),
    );

    s.delete_rule("hot").expect("delete rule");
    expect_err(s.delete_rule("hot"), "deleting it again", |e| {
        matches!(e, StoreError::NotFound { kind: "rule", .. })
    });
    assert!(open().rules().expect("rules").is_empty());
    assert_eq!(
        open()
            .alarms(&query(AlarmFilter::Any, None))
            .expect("history")
            .len(),
        3,
        "alarms outlive their rule"
    );
}
