//! An ordered set of named deadlines: at most one per key, earliest first, no stale entries.

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Instant;

/// Deadlines by key.
#[derive(Debug)]
pub(crate) struct Timers<K: Ord + Hash + Clone> {
    order: BTreeSet<(Instant, K)>,
    by_key: HashMap<K, Instant>,
}

impl<K: Ord + Hash + Clone> Timers<K> {
    pub fn new() -> Self {
        Timers {
            order: BTreeSet::new(),
            by_key: HashMap::new(),
        }
    }

    /// Sets (or moves) the deadline of `key`.
    pub fn set(&mut self, key: K, at: Instant) {
        if let Some(old) = self.by_key.insert(key.clone(), at) {
            self.order.remove(&(old, key.clone()));
        }
        self.order.insert((at, key));
    }

    /// Removes the deadline of `key`, if any.
    pub fn cancel(&mut self, key: &K) {
        if let Some(old) = self.by_key.remove(key) {
            self.order.remove(&(old, key.clone()));
        }
    }

    /// The deadline of `key`.
    pub fn deadline(&self, key: &K) -> Option<Instant> {
        self.by_key.get(key).copied()
    }

    /// The earliest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Removes and returns a key whose deadline is `<= now`, earliest first.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let (at, _) = self.order.first()?;
        if *at > now {
            return None;
        }
        let (_, key) = self.order.pop_first()?;
        self.by_key.remove(&key);
        Some(key)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn moves_and_pops_in_order() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.set(1u32, t0 + Duration::from_secs(5));
        t.set(2, t0 + Duration::from_secs(3));
        t.set(1, t0 + Duration::from_secs(1));
        assert_eq!(t.len(), 2);
        assert_eq!(t.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(t.pop_due(t0), None);
        assert_eq!(t.pop_due(t0 + Duration::from_secs(4)), Some(1));
        assert_eq!(t.pop_due(t0 + Duration::from_secs(4)), Some(2));
        assert_eq!(t.pop_due(t0 + Duration::from_secs(9)), None);
        t.set(3, t0);
        t.cancel(&3);
        assert_eq!(t.next(), None);
    }
}
