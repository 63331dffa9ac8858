//! Topic access rules for MQTT clients from the config file, in the spirit of Mosquitto's
//! `acl_file`: allow or deny publish and subscribe by user, client id and topic pattern, with
//! `%u` (user name) and `%c` (client id) substituted per client.
//!
//! ```toml
//! [mqtt.acl]
//! default = "deny"                 # what applies when no rule matches ("allow" by default)
//!
//! [[mqtt.acl.rules]]
//! permission = "allow"
//! action = "all"                   # publish | subscribe | all (Mosquitto: write | read | readwrite)
//! topic = "users/%u/#"
//!
//! [[mqtt.acl.rules]]
//! user = "dashboard"               # optional: only this user name (client_id = "…" likewise)
//! permission = "allow"
//! action = "subscribe"
//! topic = "sensors/#"
//! ```
//!
//! Rules are tried in order; the first that applies to the client, the action and the topic
//! decides. A PUBLISH applies when its topic matches the rule's pattern. A SUBSCRIBE applies
//! to an `allow` rule when the rule's pattern covers the whole filter (`sensors/#` covers
//! `sensors/+/t`), and to a `deny` rule when the two overlap at all: a subscription that could
//! receive a denied topic is refused as a whole, so nothing has to be filtered per message.
//! A rule using `%u` does not apply to clients without a user name. The rules never widen what
//! the built-in policy forbids (anonymous clients stay out of `devices/`, nobody publishes to
//! `$` topics).

use serde::{Deserialize, Serialize};
use stratus_mqtt::topic::{filter_covers, filters_overlap, is_valid_topic_filter, matches};

/// `[mqtt.acl]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// What applies when no rule matches.
    pub default: Permission,
    /// The rules, tried in order.
    pub rules: Vec<AclRule>,
}

/// One `[[mqtt.acl.rules]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    /// Allow or deny.
    pub permission: Permission,
    /// What it governs.
    #[serde(default)]
    pub action: Action,
    /// Topic pattern (a topic filter, `%u` and `%c` substituted).
    pub topic: String,
    /// Only for this user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Only for this client id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// A rule's verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// Permitted.
    #[default]
    Allow,
    /// Refused.
    Deny,
}

/// What a rule governs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// PUBLISH (and wills).
    #[serde(alias = "write")]
    Publish,
    /// SUBSCRIBE.
    #[serde(alias = "read")]
    Subscribe,
    /// Both.
    #[default]
    #[serde(alias = "readwrite")]
    All,
}

impl AclConfig {
    /// Checks every rule; the error names the key (`mqtt.acl.rules[N].topic`) and the reason.
    pub fn validate(&self) -> Result<(), String> {
        for (n, rule) in self.rules.iter().enumerate() {
            // Substitutions are whole-level values: check the pattern with a stand-in.
            let probe = rule.topic.replace("%u", "u").replace("%c", "c");
            if !is_valid_topic_filter(&probe) {
                return Err(format!(
                    "mqtt.acl.rules[{n}].topic: {:?} is not a valid topic filter",
                    rule.topic
                ));
            }
        }
        Ok(())
    }
}

/// Who a check is for.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The user name the client authenticated with, if any.
    pub user: Option<&'a str>,
    /// Its client id.
    pub client_id: &'a str,
}

/// The compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    config: AclConfig,
}

impl Acl {
    /// Rules from a validated config.
    pub fn new(config: AclConfig) -> Self {
        Acl { config }
    }

    /// Whether any rule or a deny default is configured (otherwise every check allows).
    pub fn is_active(&self) -> bool {
        !self.config.rules.is_empty() || self.config.default == Permission::Deny
    }

    /// May `who` publish to `topic`?
    pub fn may_publish(&self, who: Who<'_>, topic: &str) -> bool {
        self.decide(who, Action::Publish, |pattern, _| matches(pattern, topic))
    }

    /// May `who` subscribe to `filter` (without any `$share/{group}/` prefix)?
    pub fn may_subscribe(&self, who: Who<'_>, filter: &str) -> bool {
        self.decide(
            who,
            Action::Subscribe,
            |pattern, permission| match permission {
                Permission::Allow => filter_covers(pattern, filter),
                Permission::Deny => filters_overlap(pattern, filter),
            },
        )
    }

    fn decide(
        &self,
        who: Who<'_>,
        action: Action,
        applies: impl Fn(&str, Permission) -> bool,
    ) -> bool {
        for rule in &self.config.rules {
            if rule.action != Action::All && rule.action != action {
                continue;
            }
            if rule.user.as_deref().is_some_and(|u| Some(u) != who.user) {
                continue;
            }
            if rule
                .client_id
                .as_deref()
                .is_some_and(|c| c != who.client_id)
            {
                continue;
            }
            let Some(pattern) = substitute(&rule.topic, who) else {
                continue;
            };
            if applies(&pattern, rule.permission) {
                return rule.permission == Permission::Allow;
            }
        }
        self.config.default == Permission::Allow
    }
}

/// The pattern with `%u`/`%c` replaced; `None` when it needs a user name the client lacks, or
/// a value would inject wildcards or levels (a user named `#` gets no rule through `%u`).
fn substitute(pattern: &str, who: Who<'_>) -> Option<String> {
    if !pattern.contains('%') {
        return Some(pattern.to_string());
    }
    let safe = |v: &str| !v.contains(['+', '#', '/']);
    let mut out = pattern.to_string();
    if out.contains("%u") {
        let user = who.user.filter(|u| safe(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if !safe(who.client_id) {
            return None;
        }
        out = out.replace("%c", who.client_id);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(permission: Permission, action: Action, topic: &str) -> AclRule {
        AclRule {
            permission,
            action,
            topic: topic.into(),
            user: None,
            client_id: None,
        }
    }

    fn who<'a>(user: Option<&'a str>, client_id: &'a str) -> Who<'a> {
        Who { user, client_id }
    }

    #[test]
    fn first_matching_rule_decides_then_the_default() {
        let acl = Acl::new(AclConfig {
            default: Permission::Deny,
            rules: vec![
                rule(Permission::Deny, Action::All, "public/secret/#"),
                rule(Permission::Allow, Action::All, "public/#"),
                rule(Permission::Allow, Action::Subscribe, "news/+"),
            ],
        });
        let w = who(None, "c");
        assert!(acl.may_publish(w, "public/x"));
        assert!(!acl.may_publish(w, "public/secret/x"));
        assert!(!acl.may_publish(w, "news/today"), "subscribe-only rule");
        assert!(acl.may_subscribe(w, "news/+"));
        assert!(!acl.may_subscribe(w, "news/#"), "not covered by news/+");
        assert!(!acl.may_publish(w, "elsewhere"));
        // A filter that could receive a denied topic is refused.
        assert!(!acl.may_subscribe(w, "public/#"));
        assert!(acl.may_subscribe(w, "public/open/+"));
    }

    #[test]
    fn user_and_client_substitution_like_mosquitto_patterns() {
        let acl = Acl::new(AclConfig {
            default: Permission::Deny,
            rules: vec![
                rule(Permission::Allow, Action::All, "users/%u/#"),
                rule(Permission::Allow, Action::Publish, "clients/%c/status"),
                AclRule {
                    user: Some("ops".into()),
                    ..rule(Permission::Allow, Action::Subscribe, "users/#")
                },
            ],
        });
        assert!(acl.may_publish(who(Some("alice"), "a1"), "users/alice/x"));
        assert!(!acl.may_publish(who(Some("alice"), "a1"), "users/bob/x"));
        assert!(!acl.may_publish(who(None, "a1"), "users/alice/x"));
        assert!(acl.may_publish(who(None, "a1"), "clients/a1/status"));
        assert!(!acl.may_publish(who(None, "a1"), "clients/a2/status"));
        assert!(acl.may_subscribe(who(Some("ops"), "o"), "users/#"));
        assert!(!acl.may_subscribe(who(Some("alice"), "o"), "users/#"));
        // Wildcards smuggled in through a name do not widen a rule.
        assert!(!acl.may_publish(who(Some("#"), "x"), "users/bob/x"));
        assert!(!acl.may_subscribe(who(Some("+"), "x"), "users/+/x"));
    }

    #[test]
    fn no_rules_allow_everything_and_bad_patterns_are_config_errors() {
        let acl = Acl::default();
        assert!(!acl.is_active());
        assert!(acl.may_publish(who(None, "c"), "a/b"));
        assert!(acl.may_subscribe(who(None, "c"), "#"));
        let bad = AclConfig {
            default: Permission::Allow,
            rules: vec![rule(Permission::Deny, Action::All, "a/#/b")],
        };
        let err = bad.validate().unwrap_err();
        assert!(err.starts_with("mqtt.acl.rules[0].topic"), "{err}");
    }
}
