//! The retained-message store: one message per topic, kept in a tree of topic levels so that a
//! new subscription's filter finds its retained messages without scanning every topic.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::message::Message;

/// Retained messages by topic (MQTT 3.1.1 §3.3.1.3).
#[derive(Debug, Default)]
pub struct RetainedStore {
    root: Node,
    len: usize,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node, RandomState>,
    message: Option<Message>,
    /// Who set `message`, as the host names it ([`RetainedStore::set_by`]).
    origin: Option<Box<str>>,
}

/// The retained message a [`RetainedStore::set_by`] or [`RetainedStore::remove_by`] replaced
/// or removed: its payload size and who had set it (for per-client quotas).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Whether the topic had a retained message.
    pub existed: bool,
    /// Its payload bytes (0 when there was none).
    pub bytes: usize,
    /// Who had set it, when the host said.
    pub origin: Option<Box<str>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

impl RetainedStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total payload bytes retained.
    pub fn payload_bytes(&self) -> usize {
        self.bytes
    }

    /// Stores `message` as the retained message of its topic, replacing the previous one; an
    /// empty payload deletes the topic's retained message instead (MQTT-3.3.1-10/11). The
    /// stored copy is compacted ([`Message::compact`]).
    pub fn set(&mut self, message: Message) {
        self.set_by(message, None);
    }

    /// [`set`](Self::set), recording `origin` (who set it, as the host names it) with the
    /// message; returns what it replaced or removed.
    pub fn set_by(&mut self, message: Message, origin: Option<&str>) -> Replaced {
        if message.payload.is_empty() {
            return self.remove_by(&message.topic);
        }
        let mut node = &mut self.root;
        for level in message.topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        self.bytes += message.payload.len();
        let old_origin = std::mem::replace(&mut node.origin, origin.map(Box::from));
        match node.message.replace(message.compact()) {
            Some(old) => {
                self.bytes -= old.payload.len();
                Replaced {
                    existed: true,
                    bytes: old.payload.len(),
                    origin: old_origin,
                }
            }
            None => {
                self.len += 1;
                Replaced::default()
            }
        }
    }

    /// The payload size and origin of `topic`'s retained message, if it has one.
    pub fn usage_of(&self, topic: &str) -> Replaced {
        let mut node = &self.root;
        for level in topic.split('/') {
            match node.children.get(level) {
                Some(n) => node = n,
                None => return Replaced::default(),
            }
        }
        match &node.message {
            Some(m) => Replaced {
                existed: true,
                bytes: m.payload.len(),
                origin: node.origin.clone(),
            },
            None => Replaced::default(),
        }
    }

    /// Deletes the retained message of `topic`; returns whether there was one.
    pub fn remove(&mut self, topic: &str) -> bool {
        self.remove_by(topic).existed
    }

    /// [`remove`](Self::remove), telling what it removed.
    pub fn remove_by(&mut self, topic: &str) -> Replaced {
        let levels: Vec<&str> = topic.split('/').collect();
        match Self::remove_in(&mut self.root, &levels) {
            Some((old, origin)) => {
                self.len -= 1;
                self.bytes -= old.payload.len();
                Replaced {
                    existed: true,
                    bytes: old.payload.len(),
                    origin,
                }
            }
            None => Replaced::default(),
        }
    }

    fn remove_in(node: &mut Node, levels: &[&str]) -> Option<(Message, Option<Box<str>>)> {
        match levels {
            [] => node.message.take().map(|m| (m, node.origin.take())),
            [level, rest @ ..] => {
                let child = node.children.get_mut(*level)?;
                let removed = Self::remove_in(child, rest);
                if child.is_empty() {
                    node.children.remove(*level);
                }
                removed
            }
        }
    }

    /// The retained message of exactly `topic`.
    pub fn get(&self, topic: &str) -> Option<&Message> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.as_ref()
    }

    /// Calls `f` for every retained message whose topic matches the (valid) `filter`, with the
    /// rule that a leading wildcard does not match topics starting with `$`.
    pub fn for_each_match<'a>(&'a self, filter: &str, mut f: impl FnMut(&'a Message)) {
        Self::walk(&self.root, Some(filter), true, &mut f);
    }

    fn walk<'a>(
        node: &'a Node,
        filter: Option<&str>,
        at_root: bool,
        f: &mut impl FnMut(&'a Message),
    ) {
        let Some(filter) = filter else {
            if let Some(m) = &node.message {
                f(m);
            }
            return;
        };
        let (level, tail) = match filter.split_once('/') {
            Some((level, tail)) => (level, Some(tail)),
            None => (filter, None),
        };
        match level {
            "#" => {
                // `a/#` also matches `a` itself (MQTT-4.7.1-2's parent-level rule).
                if !at_root {
                    if let Some(m) = &node.message {
                        f(m);
                    }
                }
                for (name, child) in &node.children {
                    if at_root && name.starts_with('$') {
                        continue;
                    }
                    Self::walk_all(child, f);
                }
            }
            "+" => {
                for (name, child) in &node.children {
                    if at_root && name.starts_with('$') {
                        continue;
                    }
                    Self::walk(child, tail, false, f);
                }
            }
            literal => {
                if let Some(child) = node.children.get(literal) {
                    Self::walk(child, tail, false, f);
                }
            }
        }
    }

    fn walk_all<'a>(node: &'a Node, f: &mut impl FnMut(&'a Message)) {
        if let Some(m) = &node.message {
            f(m);
        }
        for child in node.children.values() {
            Self::walk_all(child, f);
        }
    }

    /// Every retained message, in no particular order (for persistence and statistics).
    pub fn iter(&self) -> impl Iterator<Item = &Message> {
        let mut out = Vec::with_capacity(self.len);
        Self::walk_all(&self.root, &mut |m| out.push(m));
        out.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;
    use crate::types::{MqttStr, QoS};
    use bytes::Bytes;

    fn msg(topic: &str, payload: &'static str) -> Message {
        Message::new(
            MqttStr::try_from(topic).unwrap(),
            Bytes::from_static(payload.as_bytes()),
            QoS::AtLeastOnce,
            true,
        )
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut v = Vec::new();
        store.for_each_match(filter, |m| v.push(m.topic.to_string()));
        v.sort();
        v
    }

    #[test]
    fn set_replace_delete() {
        let mut s = RetainedStore::new();
        s.set(msg("a/b", "1"));
        s.set(msg("a/b", "22"));
        assert_eq!(s.len(), 1);
        assert_eq!(s.payload_bytes(), 2);
        assert_eq!(
            s.get("a/b").map(|m| m.payload.clone()),
            Some(Bytes::from_static(b"22"))
        );
        s.set(msg("a/b", ""));
        assert!(s.is_empty());
        assert!(s.root.is_empty());
        assert_eq!(s.payload_bytes(), 0);
    }

    #[test]
    fn wildcards_find_retained_messages() {
        let mut s = RetainedStore::new();
        for t in ["a", "a/b", "a/b/c", "a/x/c", "b", "$SYS/up", "/lead"] {
            s.set(msg(t, "x"));
        }
        assert_eq!(topics(&s, "a/#"), vec!["a", "a/b", "a/b/c", "a/x/c"]);
        assert_eq!(topics(&s, "a/+/c"), vec!["a/b/c", "a/x/c"]);
        assert_eq!(
            topics(&s, "#"),
            vec!["/lead", "a", "a/b", "a/b/c", "a/x/c", "b"]
        );
        assert_eq!(topics(&s, "+"), vec!["a", "b"]);
        assert_eq!(topics(&s, "$SYS/#"), vec!["$SYS/up"]);
        assert_eq!(topics(&s, "+/lead"), vec!["/lead"]);
        for f in ["#", "+", "a/#", "+/+", "+/+/+", "/+", "a/+"] {
            let want: Vec<String> = {
                let mut v: Vec<String> = s
                    .iter()
                    .map(|m| m.topic.to_string())
                    .filter(|t| topic::matches(f, t))
                    .collect();
                v.sort();
                v
            };
            assert_eq!(topics(&s, f), want, "filter {f}");
        }
    }
}
