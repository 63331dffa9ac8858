//! The index of one set of expression rules (the rules that select a device): which rules
//! read which key, and for the rules in the fast form ([`Fast`]) their comparisons sorted by
//! key and literal, so that a record finds the few rules that can hold for it by a binary
//! search per value instead of evaluating every rule.
//!
//! Why this is exact: a fast condition is a tree of comparisons joined by `&&`, `||` and `!`,
//! and CEL evaluates it in three-valued logic (true, false, error; `&&` and `||` absorb an
//! error when the other side decides). Pushing `!` down to the comparisons (`!(t > 3)` is
//! `t <= 3`: record numbers are never NaN, a missing key is an error either way, and a
//! boolean or string is an error for `<`-like operators and unequal for `==`/`!=`) gives an
//! equivalent tree without `!`, which can only be true when one of its comparisons is true.
//! The index keeps, for each rule, such a set of *trigger* comparisons (for `a && b` the
//! smaller set of either side, for `a || b` both), so a rule none of whose triggers is true
//! for the record cannot hold: it is not evaluated. The rules that can hold, the CEL rules
//! that read the record and the rules with state for the device are evaluated exactly.

use std::collections::HashMap;
use std::sync::Arc;

use super::condition::{Cmp, Fast, Operand};
use super::CompiledRule;
use crate::ingest::Value;

/// A fast condition with its keys replaced by slot numbers.
#[derive(Debug)]
pub(super) enum Tree {
    And(Box<Tree>, Box<Tree>),
    Or(Box<Tree>, Box<Tree>),
    Not(Box<Tree>),
    /// `key op literal`, or `rate(key) op literal` when `rate`.
    Cmp {
        slot: u32,
        rate: bool,
        cmp: Cmp,
        literal: f64,
    },
}

/// What a tree reads of one record.
pub(super) trait Lookup {
    /// The record's value of a slot.
    fn value(&self, slot: u32) -> Option<&Value>;
    /// The rate of a slot, if the record has one.
    fn rate(&self, slot: u32) -> Option<f64>;
}

impl Tree {
    /// CEL's three-valued answer (`None`: an error).
    pub(super) fn eval(&self, r: &impl Lookup) -> Option<bool> {
        match self {
            Tree::And(a, b) => match a.eval(r) {
                Some(false) => Some(false),
                left => match (left, b.eval(r)) {
                    (_, Some(false)) => Some(false),
                    (Some(true), Some(true)) => Some(true),
                    _ => None,
                },
            },
            Tree::Or(a, b) => match a.eval(r) {
                Some(true) => Some(true),
                left => match (left, b.eval(r)) {
                    (_, Some(true)) => Some(true),
                    (Some(false), Some(false)) => Some(false),
                    _ => None,
                },
            },
            Tree::Not(a) => a.eval(r).map(|b| !b),
            Tree::Cmp {
                slot,
                rate: false,
                cmp,
                literal,
            } => cmp.on_value(r.value(*slot), *literal),
            Tree::Cmp {
                slot,
                rate: true,
                cmp,
                literal,
            } => Some(cmp.apply(r.rate(*slot)?, *literal)),
        }
    }
}

/// The comparisons of one key (or of its rate) with literals, by operator, each naming its
/// rule.
#[derive(Debug, Default)]
struct Atoms {
    /// `x > c` (strict) and `x >= c`, by ascending `c`, `>=` before `>` for equal `c`.
    above: Vec<(f64, bool, u32)>,
    /// `x < c` (strict) and `x <= c`, by descending `c`, `<=` before `<` for equal `c`.
    below: Vec<(f64, bool, u32)>,
    /// `x == c`, by ascending `c`.
    equal: Vec<(f64, u32)>,
    /// `x != c`.
    unequal: Vec<(f64, u32)>,
}

impl Atoms {
    fn add(&mut self, cmp: Cmp, c: f64, rule: u32) {
        // -0.0 and 0.0 compare equal but sort apart: keep one zero.
        let c = if c == 0.0 { 0.0 } else { c };
        match cmp {
            Cmp::Gt => self.above.push((c, true, rule)),
            Cmp::Ge => self.above.push((c, false, rule)),
            Cmp::Lt => self.below.push((c, true, rule)),
            Cmp::Le => self.below.push((c, false, rule)),
            Cmp::Eq => self.equal.push((c, rule)),
            Cmp::Ne => self.unequal.push((c, rule)),
        }
    }

    fn sort(&mut self) {
        self.above
            .sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        self.below
            .sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        self.equal.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    fn is_empty(&self) -> bool {
        self.above.is_empty()
            && self.below.is_empty()
            && self.equal.is_empty()
            && self.unequal.is_empty()
    }

    /// Adds the rules of the comparisons true for the number `v` to `out`.
    fn true_for(&self, v: f64, out: &mut Vec<u32>) {
        let above = |&(c, strict, _): &(f64, bool, u32)| c < v || (c == v && !strict);
        // The usual case, a value below every threshold, costs one comparison.
        if self.above.first().is_some_and(above) {
            let n = self.above.partition_point(above);
            out.extend(self.above[..n].iter().map(|a| a.2));
        }
        let below = |&(c, strict, _): &(f64, bool, u32)| c > v || (c == v && !strict);
        if self.below.first().is_some_and(below) {
            let n = self.below.partition_point(below);
            out.extend(self.below[..n].iter().map(|a| a.2));
        }
        if !self.equal.is_empty() {
            let from = self.equal.partition_point(|&(c, _)| c < v);
            let to = self.equal.partition_point(|&(c, _)| c <= v);
            out.extend(self.equal[from..to].iter().map(|a| a.1));
        }
        out.extend(self.unequal.iter().filter(|a| a.0 != v).map(|a| a.1));
    }

    /// Adds the rules of the comparisons true for a boolean or a string to `out` (only `!=`).
    fn true_for_other(&self, out: &mut Vec<u32>) {
        out.extend(self.unequal.iter().map(|a| a.1));
    }
}

/// What the index knows of one key.
#[derive(Debug, Default)]
struct Slot {
    /// Comparisons of the key's value.
    values: Atoms,
    /// Comparisons of its rate.
    rates: Atoms,
    /// Whether a rule takes its rate (then records keep its previous value).
    rated: bool,
    /// Rules without a fast form that read it.
    cel: Vec<u32>,
    /// Bit set of the rules that read it.
    readers: Vec<u64>,
    /// How many rules read it.
    reader_count: u64,
}

/// The index of one set of rules (in rule id order).
#[derive(Debug)]
pub(super) struct Index {
    rules: Arc<[Arc<CompiledRule>]>,
    positions: HashMap<String, u32>,
    slots: HashMap<String, u32>,
    names: Vec<String>,
    info: Vec<Slot>,
    trees: Vec<Option<Tree>>,
    words: usize,
}

impl Index {
    /// Indexes `rules` (expression rules; others are ignored).
    pub(super) fn new(rules: Arc<[Arc<CompiledRule>]>) -> Index {
        let words = rules.len().div_ceil(64);
        let mut index = Index {
            positions: HashMap::new(),
            slots: HashMap::new(),
            names: Vec::new(),
            info: Vec::new(),
            trees: Vec::with_capacity(rules.len()),
            words,
            rules: rules.clone(),
        };
        for (pos, rule) in rules.iter().enumerate() {
            let pos = pos as u32;
            index.positions.insert(rule.id.clone(), pos);
            let Some(condition) = &rule.condition else {
                index.trees.push(None);
                continue;
            };
            for key in condition.keys() {
                let slot = index.slot_of(key) as usize;
                let s = &mut index.info[slot];
                s.readers[pos as usize / 64] |= 1 << (pos % 64);
                s.reader_count += 1;
            }
            for key in condition.rate_keys() {
                let slot = index.slot_of(key) as usize;
                index.info[slot].rated = true;
            }
            match condition.fast() {
                Some(fast) => {
                    let tree = index.tree(fast);
                    for (operand, cmp, c) in triggers(fast, true) {
                        let (key, rate) = match operand {
                            Operand::Key(k) => (k, false),
                            Operand::Rate(k) => (k, true),
                        };
                        let slot = index.slot_of(key) as usize;
                        let s = &mut index.info[slot];
                        if rate {
                            s.rates.add(cmp, c, pos);
                        } else {
                            s.values.add(cmp, c, pos);
                        }
                    }
                    index.trees.push(Some(tree));
                }
                None => {
                    for key in condition.keys() {
                        let slot = index.slot_of(key) as usize;
                        index.info[slot].cel.push(pos);
                    }
                    index.trees.push(None);
                }
            }
        }
        for s in &mut index.info {
            s.values.sort();
            s.rates.sort();
        }
        index
    }

    fn slot_of(&mut self, key: &str) -> u32 {
        if let Some(&s) = self.slots.get(key) {
            return s;
        }
        let s = self.names.len() as u32;
        self.slots.insert(key.to_owned(), s);
        self.names.push(key.to_owned());
        self.info.push(Slot {
            readers: vec![0; self.words],
            ..Slot::default()
        });
        s
    }

    fn tree(&mut self, f: &Fast) -> Tree {
        match f {
            Fast::And(a, b) => Tree::And(Box::new(self.tree(a)), Box::new(self.tree(b))),
            Fast::Or(a, b) => Tree::Or(Box::new(self.tree(a)), Box::new(self.tree(b))),
            Fast::Not(a) => Tree::Not(Box::new(self.tree(a))),
            Fast::Cmp(operand, cmp, literal) => {
                let (key, rate) = match operand {
                    Operand::Key(k) => (k, false),
                    Operand::Rate(k) => (k, true),
                };
                Tree::Cmp {
                    slot: self.slot_of(key),
                    rate,
                    cmp: *cmp,
                    literal: *literal,
                }
            }
        }
    }

    /// The rules, in id order.
    pub(super) fn rules(&self) -> &Arc<[Arc<CompiledRule>]> {
        &self.rules
    }

    /// The position of a rule.
    pub(super) fn position(&self, rule: &str) -> Option<u32> {
        self.positions.get(rule).copied()
    }

    /// The slot of a key any rule reads.
    pub(super) fn slot(&self, key: &str) -> Option<u32> {
        self.slots.get(key).copied()
    }

    /// The key of a slot.
    pub(super) fn name(&self, slot: u32) -> &str {
        self.names.get(slot as usize).map_or("", String::as_str)
    }

    /// Whether rules take the rate of the slot's key.
    pub(super) fn rated(&self, slot: u32) -> bool {
        self.info.get(slot as usize).is_some_and(|s| s.rated)
    }

    /// The fast tree of the rule at `pos`, if it has one.
    pub(super) fn tree_of(&self, pos: u32) -> Option<&Tree> {
        self.trees.get(pos as usize).and_then(Option::as_ref)
    }

    /// Words of a rule bit set.
    pub(super) fn words(&self) -> usize {
        self.words
    }

    /// Adds to `out` the rules that can hold when the record's value of `slot` is `v`:
    /// those with a true trigger comparison, and those without a fast form that read it.
    pub(super) fn candidates_for_value(&self, slot: u32, v: &Value, out: &mut Vec<u32>) {
        let Some(s) = self.info.get(slot as usize) else {
            return;
        };
        if !s.values.is_empty() {
            match v {
                Value::Number(n) => s.values.true_for(*n, out),
                _ => s.values.true_for_other(out),
            }
        }
        out.extend_from_slice(&s.cel);
    }

    /// Adds to `out` the rules with a true trigger comparison on the rate `r` of `slot`.
    pub(super) fn candidates_for_rate(&self, slot: u32, r: f64, out: &mut Vec<u32>) {
        if let Some(s) = self.info.get(slot as usize) {
            s.rates.true_for(r, out);
        }
    }

    /// How many rules read the slot's key.
    pub(super) fn reader_count(&self, slot: u32) -> u64 {
        self.info.get(slot as usize).map_or(0, |s| s.reader_count)
    }

    /// Adds the rules reading the slot's key to the bit set `bits`.
    pub(super) fn add_readers(&self, slot: u32, bits: &mut [u64]) {
        if let Some(s) = self.info.get(slot as usize) {
            for (b, r) in bits.iter_mut().zip(&s.readers) {
                *b |= r;
            }
        }
    }
}

/// The trigger comparisons of `f` (of `!f` when not `positive`): when `f` is true, one of
/// them is.
fn triggers(f: &Fast, positive: bool) -> Vec<(&Operand, Cmp, f64)> {
    match (f, positive) {
        (Fast::Cmp(x, cmp, c), true) => vec![(x, *cmp, *c)],
        (Fast::Cmp(x, cmp, c), false) => vec![(x, cmp.negate(), *c)],
        (Fast::Not(a), _) => triggers(a, !positive),
        // Both sides must be true: the triggers of either side will do.
        (Fast::And(a, b), true) | (Fast::Or(a, b), false) => {
            let (a, b) = (triggers(a, positive), triggers(b, positive));
            let cost = |t: &[(&Operand, Cmp, f64)]| {
                t.len() + 4 * t.iter().filter(|x| x.1 == Cmp::Ne).count()
            };
            if cost(&b) < cost(&a) {
                b
            } else {
                a
            }
        }
        // One side is true: the triggers of both.
        (Fast::Or(a, b), true) | (Fast::And(a, b), false) => {
            let mut t = triggers(a, positive);
            t.extend(triggers(b, positive));
            t
        }
    }
}
