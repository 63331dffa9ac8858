//! The subscription tree: topic filters arranged by level, so that matching a topic costs
//! time in proportion to its depth and to the subscriptions that can match it, not to the
//! total number of subscriptions.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use crate::types::QoS;

/// Maps topic filters to subscribers. `S` identifies a subscriber (the server uses a handle
/// to the client's session); one subscriber holds at most one subscription per filter.
#[derive(Debug)]
pub struct SubscriptionTree<S> {
    root: Node<S>,
    len: usize,
}

#[derive(Debug)]
struct Node<S> {
    /// Children by literal level.
    children: HashMap<Box<str>, Node<S>, RandomState>,
    /// The `+` child.
    plus: Option<Box<Node<S>>>,
    /// Subscriptions whose filter ends at this node.
    exact: Vec<(S, QoS)>,
    /// Subscriptions whose filter is this node's path followed by `/#`.
    multi: Vec<(S, QoS)>,
}

impl<S> Default for Node<S> {
    fn default() -> Self {
        Node {
            children: HashMap::default(),
            plus: None,
            exact: Vec::new(),
            multi: Vec::new(),
        }
    }
}

impl<S> Node<S> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.multi.is_empty()
    }
}

impl<S> Default for SubscriptionTree<S> {
    fn default() -> Self {
        SubscriptionTree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<S: PartialEq> SubscriptionTree<S> {
    /// An empty tree.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `subscriber`'s subscription to `filter` (which must be valid); a
    /// replacement also stores the new `subscriber` value (it may carry options).
    /// Returns true when it replaced an existing one.
    pub fn insert(&mut self, filter: &str, subscriber: S, qos: QoS) -> bool {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" && levels.peek().is_none() {
                return Self::upsert(&mut node.multi, subscriber, qos, &mut self.len);
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Box::default)
            } else {
                node.children.entry(level.into()).or_default()
            };
        }
        Self::upsert(&mut node.exact, subscriber, qos, &mut self.len)
    }

    fn upsert(list: &mut Vec<(S, QoS)>, subscriber: S, qos: QoS, len: &mut usize) -> bool {
        if let Some(entry) = list.iter_mut().find(|(s, _)| *s == subscriber) {
            *entry = (subscriber, qos);
            true
        } else {
            list.push((subscriber, qos));
            *len += 1;
            false
        }
    }

    /// Removes `subscriber`'s subscription to `filter`; returns whether there was one.
    pub fn remove(&mut self, filter: &str, subscriber: &S) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_in(&mut self.root, &levels, subscriber);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_in(node: &mut Node<S>, levels: &[&str], subscriber: &S) -> bool {
        let take = |list: &mut Vec<(S, QoS)>| match list.iter().position(|(s, _)| s == subscriber) {
            Some(i) => {
                list.swap_remove(i);
                true
            }
            None => false,
        };
        match levels {
            [] => take(&mut node.exact),
            ["#"] => take(&mut node.multi),
            ["+", rest @ ..] => {
                let Some(child) = node.plus.as_mut() else {
                    return false;
                };
                let removed = Self::remove_in(child, rest, subscriber);
                if child.is_empty() {
                    node.plus = None;
                }
                removed
            }
            [level, rest @ ..] => {
                let Some(child) = node.children.get_mut(*level) else {
                    return false;
                };
                let removed = Self::remove_in(child, rest, subscriber);
                if child.is_empty() {
                    node.children.remove(*level);
                }
                removed
            }
        }
    }

    /// Calls `f` for every subscription whose filter matches the topic `name`. A subscriber
    /// with several matching filters is reported once per filter.
    pub fn for_each_match<'a>(&'a self, name: &str, mut f: impl FnMut(&'a S, QoS)) {
        self.for_each_matching_list(name, |list| {
            for (s, q) in list {
                f(s, *q);
            }
        });
    }

    /// Calls `f` with each non-empty list of subscriptions that share one matching filter.
    /// Within one list a subscriber appears at most once, so a caller that gets a single list
    /// needs no de-duplication.
    pub fn for_each_matching_list<'a>(&'a self, name: &str, mut f: impl FnMut(&'a [(S, QoS)])) {
        let dollar = name.starts_with('$');
        Self::walk(&self.root, Some(name), dollar, &mut f);
    }

    fn walk<'a>(
        node: &'a Node<S>,
        rest: Option<&str>,
        skip_wildcards: bool,
        f: &mut impl FnMut(&'a [(S, QoS)]),
    ) {
        if !skip_wildcards && !node.multi.is_empty() {
            f(&node.multi);
        }
        let Some(rest) = rest else {
            if !node.exact.is_empty() {
                f(&node.exact);
            }
            return;
        };
        // A plain byte scan: levels are short, and `split_once`'s searcher (memchr set-up)
        // cost more than the scan itself.
        let (level, tail) = match rest.bytes().position(|b| b == b'/') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if let Some(child) = node.children.get(level) {
            Self::walk(child, tail, false, f);
        }
        if !skip_wildcards {
            if let Some(plus) = &node.plus {
                Self::walk(plus, tail, false, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;

    fn matched(tree: &SubscriptionTree<u32>, name: &str) -> Vec<(u32, QoS)> {
        let mut v = Vec::new();
        tree.for_each_match(name, |s, q| v.push((*s, q)));
        v.sort_by_key(|(s, _)| *s);
        v
    }

    #[test]
    fn matches_literal_plus_and_hash() {
        let mut t = SubscriptionTree::new();
        t.insert("a/b/c", 1, QoS::AtMostOnce);
        t.insert("a/+/c", 2, QoS::AtLeastOnce);
        t.insert("a/#", 3, QoS::ExactlyOnce);
        t.insert("#", 4, QoS::AtMostOnce);
        t.insert("x/y", 5, QoS::AtMostOnce);
        assert_eq!(
            matched(&t, "a/b/c").iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(
            matched(&t, "a").iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![3, 4]
        );
        assert_eq!(
            matched(&t, "x/y/z").iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![4]
        );
        assert_eq!(matched(&t, "$SYS/x").len(), 0);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn insert_replaces_and_remove_prunes() {
        let mut t = SubscriptionTree::new();
        assert!(!t.insert("a/+", 1, QoS::AtMostOnce));
        assert!(t.insert("a/+", 1, QoS::ExactlyOnce));
        assert_eq!(matched(&t, "a/b"), vec![(1, QoS::ExactlyOnce)]);
        assert!(t.remove("a/+", &1));
        assert!(!t.remove("a/+", &1));
        assert!(t.root.is_empty());
        assert!(t.is_empty());
    }

    proptest::proptest! {
        /// The tree agrees with the one-filter matcher on arbitrary filters and names.
        #[test]
        fn tree_agrees_with_reference_matcher(
            filters in proptest::collection::vec("(\\$?[ab+#]?)(/[ab+#]?){0,3}", 1..12),
            names in proptest::collection::vec("\\$?[ab]?(/[ab]?){0,3}", 1..12),
        ) {
            let filters: Vec<String> = filters.into_iter().filter(|f| topic::is_valid_topic_filter(f)).collect();
            let mut t = SubscriptionTree::new();
            for (i, f) in filters.iter().enumerate() {
                t.insert(f, i as u32, QoS::AtMostOnce);
            }
            for n in names.iter().filter(|n| topic::is_valid_topic_name(n)) {
                let mut want: Vec<u32> = filters.iter().enumerate()
                    .filter(|(_, f)| topic::matches(f, n)).map(|(i, _)| i as u32).collect();
                want.sort();
                let got: Vec<u32> = matched(&t, n).into_iter().map(|x| x.0).collect();
                proptest::prop_assert_eq!(got, want, "name {:?}", n);
            }
            for (i, f) in filters.iter().enumerate() {
                proptest::prop_assert!(t.remove(f, &(i as u32)));
            }
            proptest::prop_assert!(t.root.is_empty());
        }
    }
}
