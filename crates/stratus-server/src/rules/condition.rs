//! Rule conditions: CEL expressions over one telemetry record, compiled once, evaluated per
//! record with the record's keys as variables and `rate(key)` as the per-second change of a
//! key since the device's previous record.
//!
//! A condition is true only when it evaluates to the boolean `true`. A key the record does
//! not have, a type mismatch (`"on" > 3`) or any other evaluation error makes it false, never
//! an error: devices send what they send.
//!
//! Series flattened from nested objects have dotted names (`{"loc": {"lat": 55.9}}` is
//! `loc.lat`, see [`crate::ingest`]), and a condition names them the same way: `loc.lat > 55`,
//! `rate(loc.lat)`. CEL reads `loc.lat` as the field `lat` of a variable `loc`; compiling
//! rewrites every such chain of names into the one variable `loc.lat`, so the record's keys,
//! the fast path and the rule index see the series name.

use std::collections::BTreeSet;

use cel::common::ast::{operators, CallExpr, Expr, IdedExpr, LiteralValue};
use cel::{Context, Program, Value};
use serde_json::{Map, Value as Json};

/// Longest accepted condition, in bytes.
pub const MAX_CONDITION_LEN: usize = 2048;

/// Deepest accepted nesting of brackets, and most operator characters: the parser and the
/// evaluator recurse, so hostile input must not get to build a deep tree.
pub const MAX_NESTING: usize = 32;
/// See [`MAX_NESTING`].
pub const MAX_OPERATORS: usize = 256;

/// Deepest accepted expression tree.
pub const MAX_DEPTH: usize = 24;

/// Stack of the compiling thread.
const COMPILE_STACK: usize = 64 << 20;

/// The depth of an expression tree; `None` for map and message literals.
fn depth(e: &IdedExpr) -> Option<usize> {
    let children = match &e.expr {
        Expr::Call(c) => {
            let mut d = 0;
            if let Some(t) = &c.target {
                d = depth(t)?;
            }
            for a in &c.args {
                d = d.max(depth(a)?);
            }
            d
        }
        Expr::Select(s) => depth(&s.operand)?,
        Expr::List(l) => {
            let mut d = 0;
            for el in &l.elements {
                d = d.max(depth(el)?);
            }
            d
        }
        Expr::Comprehension(c) => [
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ]
        .into_iter()
        .map(depth)
        .try_fold(0, |acc, d| d.map(|d| acc.max(d)))?,
        Expr::Map(_) | Expr::Struct(_) => return None,
        _ => 0,
    };
    Some(children + 1)
}

/// Refuses conditions whose tree would be too deep to parse and evaluate safely.
fn check_shape(source: &str) -> Result<(), ConditionError> {
    let (mut depth, mut deepest, mut operators) = (0usize, 0usize, 0usize);
    let mut in_string: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        if let Some(q) = in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                in_string = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => in_string = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            '!' | '-' | '+' | '*' | '/' | '%' | '<' | '>' | '=' | '&' | '|' | '?' | ':' | '.' => {
                operators += 1
            }
            _ => {}
        }
    }
    if deepest > MAX_NESTING {
        return Err(ConditionError(format!(
            "the condition nests brackets deeper than {MAX_NESTING}"
        )));
    }
    if operators > MAX_OPERATORS {
        return Err(ConditionError(format!(
            "the condition has more than {MAX_OPERATORS} operator characters"
        )));
    }
    Ok(())
}

/// A condition that did not compile; the text names the line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConditionError(pub String);

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    source: String,
    expr: IdedExpr,
    fast: Option<Fast>,
    keys: Vec<String>,
    rate_keys: Vec<String>,
}

/// The variable name `rate(key)` is evaluated from.
pub fn rate_variable(key: &str) -> String {
    format!("rate({key})")
}

impl Condition {
    /// Compiles `source`. The CEL parser recurses deeply (a dozen nested parentheses take
    /// 2 MiB of stack in a debug build), so compiling runs on its own thread with a large
    /// stack; the tree it builds is then refused if deeper than [`MAX_DEPTH`], which keeps
    /// evaluation on the ingestion path shallow.
    pub fn compile(source: &str) -> Result<Condition, ConditionError> {
        let source = source.to_owned();
        std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(COMPILE_STACK)
            .spawn(move || Condition::compile_here(&source))
            .map_err(|e| ConditionError(format!("cannot compile now: {e}")))?
            .join()
            .unwrap_or_else(|_| {
                Err(ConditionError(
                    "invalid condition at line 1 column 1: cannot be parsed".into(),
                ))
            })
    }

    fn compile_here(source: &str) -> Result<Condition, ConditionError> {
        if source.trim().is_empty() {
            return Err(ConditionError("the condition is empty".into()));
        }
        if source.len() > MAX_CONDITION_LEN {
            return Err(ConditionError(format!(
                "the condition must be at most {MAX_CONDITION_LEN} bytes"
            )));
        }
        check_shape(source)?;
        // The CEL parser is generated code; it must not take the server down on odd input.
        let compiled = std::panic::catch_unwind(|| Program::compile(source)).map_err(|_| {
            ConditionError("invalid condition at line 1 column 1: cannot be parsed".into())
        })?;
        let program = compiled.map_err(|errors| {
            let first = errors.errors.first();
            match first {
                Some(e) => ConditionError(format!(
                    "invalid condition at line {} column {}: {}",
                    e.pos.0.max(1),
                    e.pos.1.max(1),
                    e.msg
                )),
                None => ConditionError("invalid condition".into()),
            }
        })?;
        let mut expr = program.expression().clone();
        match depth(&expr) {
            Some(d) if d <= MAX_DEPTH => {}
            Some(_) => {
                return Err(ConditionError(format!(
                    "the condition nests deeper than {MAX_DEPTH} operations"
                )))
            }
            None => {
                return Err(ConditionError(
                    "map and message literals are not supported in conditions".into(),
                ))
            }
        }
        join_dotted_names(&mut expr);
        // Read before `rate(key)` becomes a variable: the key inside is what the record has.
        let mut keys: BTreeSet<String> = expr
            .references()
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut rate_keys = BTreeSet::new();
        rewrite_rates(&mut expr, &mut rate_keys)?;
        keys.extend(rate_keys.iter().cloned());
        Ok(Condition {
            source: source.to_owned(),
            fast: Fast::compile(&expr),
            expr,
            keys: keys.into_iter().collect(),
            rate_keys: rate_keys.into_iter().collect(),
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The record keys it reads (a record with none of them leaves the rule as it was).
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The keys it takes `rate()` of.
    pub fn rate_keys(&self) -> &[String] {
        &self.rate_keys
    }

    /// Whether the record touches this condition: it has one of its keys.
    pub fn reads_any(&self, values: &Map<String, Json>) -> bool {
        self.keys.iter().any(|k| values.contains_key(k))
    }

    /// Evaluates against a scope built by [`with_scope`].
    pub fn eval(&self, scope: &Context<'_, '_>) -> bool {
        matches!(Value::resolve(&self.expr, scope), Ok(Value::Bool(true)))
    }

    /// Whether it evaluates without a CEL scope ([`Condition::eval_fast`]).
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The fast form, if it has one.
    pub(super) fn fast(&self) -> Option<&Fast> {
        self.fast.as_ref()
    }

    /// Evaluates a condition made only of numeric comparisons of keys (or rates) with
    /// literals joined by `&&`, `||` and `!`, directly on the record: the same answer as
    /// [`Condition::eval`], without building a CEL scope. `None` when it is not such a
    /// condition.
    pub fn eval_fast(&self, values: &Map<String, Json>, rates: &[(String, f64)]) -> Option<bool> {
        self.fast
            .as_ref()
            .map(|f| f.eval(values, rates) == Some(true))
    }
}

/// The fast form of a simple condition: numeric comparisons of a key (or its rate) with a
/// literal, joined by `&&`, `||` and `!`.
#[derive(Debug, Clone)]
pub(super) enum Fast {
    And(Box<Fast>, Box<Fast>),
    Or(Box<Fast>, Box<Fast>),
    Not(Box<Fast>),
    Cmp(Operand, Cmp, f64),
}

/// What a comparison reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Operand {
    Key(String),
    Rate(String),
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Cmp {
    fn parse(op: &str) -> Option<Cmp> {
        Some(match op {
            operators::LESS => Cmp::Lt,
            operators::LESS_EQUALS => Cmp::Le,
            operators::GREATER => Cmp::Gt,
            operators::GREATER_EQUALS => Cmp::Ge,
            operators::EQUALS => Cmp::Eq,
            operators::NOT_EQUALS => Cmp::Ne,
            _ => return None,
        })
    }

    /// `a op b` becomes `b flip(op) a`.
    fn flip(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            other => other,
        }
    }

    /// `!(a op b)` is `a negate(op) b` (numbers are never NaN).
    pub(super) fn negate(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Ge,
            Cmp::Le => Cmp::Gt,
            Cmp::Gt => Cmp::Le,
            Cmp::Ge => Cmp::Lt,
            Cmp::Eq => Cmp::Ne,
            Cmp::Ne => Cmp::Eq,
        }
    }

    /// CEL's `a op b` for a record value `a` (`None`: the key is missing or an error).
    /// Comparing a boolean or a string with a number is an error for `<`, `<=`, `>`, `>=`
    /// and plain inequality for `==` and `!=` (CEL's heterogeneous equality).
    pub(super) fn on_value(self, a: Option<&crate::ingest::Value>, b: f64) -> Option<bool> {
        match a? {
            crate::ingest::Value::Number(n) => Some(self.apply(*n, b)),
            _ => match self {
                Cmp::Eq => Some(false),
                Cmp::Ne => Some(true),
                _ => None,
            },
        }
    }

    /// `a op b` on numbers.
    pub(super) fn apply(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }
}

/// A numeric literal (CEL compares numbers of mixed types as doubles); `-` of an int or a
/// double literal too (negating a uint is an error in CEL, so that stays with CEL).
fn literal(e: &IdedExpr) -> Option<f64> {
    match &e.expr {
        Expr::Literal(LiteralValue::Double(d)) if !d.is_nan() => Some(**d),
        Expr::Literal(LiteralValue::Int(i)) => Some(**i as f64),
        Expr::Literal(LiteralValue::UInt(u)) => Some(**u as f64),
        Expr::Call(CallExpr {
            func_name,
            target: None,
            args,
        }) if func_name == operators::NEGATE && args.len() == 1 => match &args[0].expr {
            Expr::Literal(LiteralValue::Double(d)) if !d.is_nan() => Some(-**d),
            Expr::Literal(LiteralValue::Int(i)) => i.checked_neg().map(|v| v as f64),
            _ => None,
        },
        _ => None,
    }
}

fn operand(e: &IdedExpr) -> Option<Operand> {
    match &e.expr {
        Expr::Ident(name) => Some(
            match name.strip_prefix("rate(").and_then(|r| r.strip_suffix(')')) {
                Some(key) => Operand::Rate(key.to_owned()),
                None => Operand::Key(name.clone()),
            },
        ),
        _ => None,
    }
}

impl Fast {
    fn compile(e: &IdedExpr) -> Option<Fast> {
        let Expr::Call(CallExpr {
            func_name,
            target: None,
            args,
        }) = &e.expr
        else {
            return None;
        };
        match (func_name.as_str(), args.as_slice()) {
            (operators::LOGICAL_AND, [a, b]) => Some(Fast::And(
                Box::new(Fast::compile(a)?),
                Box::new(Fast::compile(b)?),
            )),
            (operators::LOGICAL_OR, [a, b]) => Some(Fast::Or(
                Box::new(Fast::compile(a)?),
                Box::new(Fast::compile(b)?),
            )),
            (operators::LOGICAL_NOT, [a]) => Some(Fast::Not(Box::new(Fast::compile(a)?))),
            (op, [a, b]) => {
                let cmp = Cmp::parse(op)?;
                match (operand(a), literal(b), literal(a), operand(b)) {
                    (Some(x), Some(v), _, _) => Some(Fast::Cmp(x, cmp, v)),
                    (_, _, Some(v), Some(x)) => Some(Fast::Cmp(x, cmp.flip(), v)),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// CEL's answer: `Some(bool)`, or `None` for an error (a missing key, not a number);
    /// `&&` and `||` absorb an error when the other side decides, as in CEL.
    fn eval(&self, values: &Map<String, Json>, rates: &[(String, f64)]) -> Option<bool> {
        match self {
            Fast::And(a, b) => match (a.eval(values, rates), b.eval(values, rates)) {
                (Some(false), _) | (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Fast::Or(a, b) => match (a.eval(values, rates), b.eval(values, rates)) {
                (Some(true), _) | (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            Fast::Not(a) => a.eval(values, rates).map(|b| !b),
            Fast::Cmp(Operand::Key(k), cmp, v) => match values.get(k)? {
                Json::Number(n) => Some(cmp.apply(n.as_f64()?, *v)),
                Json::Bool(_) | Json::String(_) => match cmp {
                    Cmp::Eq => Some(false),
                    Cmp::Ne => Some(true),
                    _ => None,
                },
                _ => None,
            },
            Fast::Cmp(Operand::Rate(k), cmp, v) => {
                Some(cmp.apply(rates.iter().find(|(r, _)| r == k)?.1, *v))
            }
        }
    }
}

/// Replaces every chain of names `a.b.c` (CEL: field `c` of field `b` of variable `a`) by
/// the variable `a.b.c`: the dotted name of a series flattened from nested objects. `has()`
/// tests are left as they are.
fn join_dotted_names(e: &mut IdedExpr) {
    if let Expr::Select(select) = &e.expr {
        if !select.test {
            if let Some(name) = dotted_name(e) {
                e.expr = Expr::Ident(name);
                return;
            }
        }
    }
    match &mut e.expr {
        Expr::Call(call) => {
            if let Some(t) = &mut call.target {
                join_dotted_names(t);
            }
            for a in &mut call.args {
                join_dotted_names(a);
            }
        }
        Expr::Select(select) => join_dotted_names(&mut select.operand),
        Expr::List(list) => {
            for el in &mut list.elements {
                join_dotted_names(el);
            }
        }
        Expr::Comprehension(c) => {
            for part in [
                &mut c.iter_range,
                &mut c.accu_init,
                &mut c.loop_cond,
                &mut c.loop_step,
                &mut c.result,
            ] {
                join_dotted_names(part);
            }
        }
        _ => {}
    }
}

/// `a.b.c` for a chain of field selections rooted at a name, else `None`.
fn dotted_name(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Ident(name) => Some(name.clone()),
        Expr::Select(select) if !select.test => {
            let mut name = dotted_name(&select.operand)?;
            name.push('.');
            name.push_str(&select.field);
            Some(name)
        }
        _ => None,
    }
}

/// Replaces every `rate(key)` call by the variable `rate(key)`; refuses other `rate` uses.
fn rewrite_rates(e: &mut IdedExpr, keys: &mut BTreeSet<String>) -> Result<(), ConditionError> {
    match &mut e.expr {
        Expr::Call(CallExpr {
            func_name,
            target,
            args,
        }) => {
            if func_name == "rate" {
                let key = match (target.as_ref(), args.as_slice()) {
                    (
                        None,
                        [IdedExpr {
                            expr: Expr::Ident(key),
                            ..
                        }],
                    ) => key.clone(),
                    _ => return Err(ConditionError(
                        "invalid condition: rate() takes one record key, as in rate(temperature)"
                            .into(),
                    )),
                };
                e.expr = Expr::Ident(rate_variable(&key));
                keys.insert(key);
                return Ok(());
            }
            if let Some(t) = target {
                rewrite_rates(t, keys)?;
            }
            for a in args {
                rewrite_rates(a, keys)?;
            }
            Ok(())
        }
        Expr::Select(select) => rewrite_rates(&mut select.operand, keys),
        Expr::List(list) => {
            for el in &mut list.elements {
                rewrite_rates(el, keys)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Converts a record value to CEL: numbers are doubles, booleans and strings as they are.
pub fn to_cel(v: &Json) -> Option<Value> {
    match v {
        Json::Number(n) => n.as_f64().map(Value::Float),
        Json::Bool(b) => Some(Value::Bool(*b)),
        Json::String(s) => Some(Value::String(std::sync::Arc::new(s.clone()))),
        _ => None,
    }
}

thread_local! {
    static ROOT: Context<'static, 'static> = Context::default();
}

/// Runs `f` with a CEL scope holding a record's `(key, value)` and `(key, rate)` pairs (as
/// `rate(key)` variables).
pub fn with_record_scope<'v, R>(
    values: impl Iterator<Item = (&'v str, &'v crate::ingest::Value)>,
    rates: impl Iterator<Item = (&'v str, f64)>,
    f: impl FnOnce(&Context<'_, '_>) -> R,
) -> R {
    ROOT.with(|root| {
        let mut scope = root.new_inner_scope();
        for (k, v) in values {
            let v = match v {
                crate::ingest::Value::Number(n) => Value::Float(*n),
                crate::ingest::Value::Bool(b) => Value::Bool(*b),
                crate::ingest::Value::Text(t) => Value::String(std::sync::Arc::new(t.clone())),
            };
            scope.add_variable_from_value(k, v);
        }
        for (k, r) in rates {
            scope.add_variable_from_value(rate_variable(k), Value::Float(r));
        }
        f(&scope)
    })
}

/// Runs `f` with a CEL scope holding `values` (and `rates`, as `rate(key)` variables) for
/// evaluating conditions. The standard library is built once per thread.
pub fn with_scope<R>(
    values: &Map<String, Json>,
    rates: &[(String, f64)],
    f: impl FnOnce(&Context<'_, '_>) -> R,
) -> R {
    ROOT.with(|root| {
        let mut scope = root.new_inner_scope();
        for (k, v) in values {
            if let Some(v) = to_cel(v) {
                scope.add_variable_from_value(k.as_str(), v);
            }
        }
        for (k, r) in rates {
            scope.add_variable_from_value(rate_variable(k), Value::Float(*r));
        }
        f(&scope)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The CEL answer, checked against the fast path when there is one.
    fn eval(cond: &str, values: Json, rates: &[(String, f64)]) -> bool {
        let c = Condition::compile(cond).unwrap();
        let Json::Object(values) = values else {
            panic!("values must be an object")
        };
        let slow = with_scope(&values, rates, |s| c.eval(s));
        if let Some(fast) = c.eval_fast(&values, rates) {
            assert_eq!(
                fast, slow,
                "fast and CEL disagree on {cond} with {values:?}"
            );
        }
        slow
    }

    #[test]
    fn simple_comparisons_take_the_fast_path_and_agree_with_cel() {
        for c in [
            "t > 30",
            "30 < t",
            "t >= -1.5 && !(h == 3)",
            "t < 1 || rate(t) > 2",
            "t != 4u",
        ] {
            assert!(Condition::compile(c).unwrap().is_fast(), "{c}");
        }
        for c in ["t > h", "mode == 'eco'", "t + 1 > 3", "t in [1, 2]", "door"] {
            assert!(!Condition::compile(c).unwrap().is_fast(), "{c}");
        }
        let r = vec![("t".to_string(), 3.0)];
        for values in [
            json!({"t": 31}),
            json!({"t": -2, "h": 3}),
            json!({"h": 1}),
            json!({"t": "x"}),
            json!({"t": 0.5}),
            json!({}),
        ] {
            for c in [
                "t > 30",
                "30 < t",
                "t >= -1.5 && !(h == 3)",
                "t < 1 || rate(t) > 2",
                "h > 0 || t > 0",
                "!(t > 0)",
                "t > 0 && h > 0",
            ] {
                eval(c, values.clone(), &r);
                eval(c, values.clone(), &[]);
            }
        }
    }

    #[test]
    fn the_fast_path_keeps_cel_semantics_for_odd_values_and_literals() {
        // A string or boolean is unequal to a number (not an error), so `!` turns it true.
        assert!(eval("!(t == 1)", json!({"t": "x"}), &[]));
        assert!(eval("t != 1", json!({"t": true}), &[]));
        assert!(!eval("t == 1", json!({"t": true}), &[]));
        // ... but ordering it against a number is an error, under `!` too.
        assert!(!eval("!(t > 1)", json!({"t": "x"}), &[]));
        assert!(eval("t < 1 || h > 2", json!({"t": "x", "h": 3}), &[]));
        assert!(!eval("!(t < 1 && h > 2)", json!({"t": "x", "h": 3}), &[]));
        assert!(eval("!(t < 1 && h > 2)", json!({"t": "x", "h": 1}), &[]));
        // Negating a uint is an error in CEL: such a literal stays with CEL.
        assert!(!Condition::compile("t > -4u").unwrap().is_fast());
        assert!(!eval("t > -4u", json!({"t": 1}), &[]));
        assert!(eval("t > -4", json!({"t": 1}), &[]));
        assert!(eval("t == -0.0", json!({"t": 0}), &[]));
    }

    #[test]
    fn conditions_compare_numbers_booleans_and_strings() {
        let c = "temperature > 30 && humidity < 20";
        assert!(eval(c, json!({"temperature": 31.5, "humidity": 10}), &[]));
        assert!(!eval(c, json!({"temperature": 30, "humidity": 10}), &[]));
        assert!(!eval(c, json!({"temperature": 35, "humidity": 25.5}), &[]));
        assert!(eval("temperature >= 30.5", json!({"temperature": 31}), &[]));
        assert!(eval("door == true", json!({"door": true}), &[]));
        assert!(eval("mode == 'eco'", json!({"mode": "eco"}), &[]));
        assert!(eval(
            "battery < 15 || charging",
            json!({"battery": 50, "charging": true}),
            &[]
        ));
    }

    #[test]
    fn missing_keys_and_type_errors_are_false() {
        assert!(!eval("temperature > 30", json!({"humidity": 50}), &[]));
        assert!(!eval(
            "temperature > 30",
            json!({"temperature": "hot"}),
            &[]
        ));
        assert!(!eval("temperature", json!({"temperature": 40}), &[]));
        assert!(!eval(
            "nosuchfn(temperature)",
            json!({"temperature": 40}),
            &[]
        ));
    }

    #[test]
    fn dotted_series_are_named_with_dots() {
        // `{"loc": {"lat": 55.9}}` is stored as the series `loc.lat`.
        let c = Condition::compile("loc.lat > 55.5 && rate(loc.lon) < 1.0").unwrap();
        assert!(
            c.is_fast(),
            "a dotted name is a plain key for the fast path"
        );
        assert_eq!(c.keys(), ["loc.lat", "loc.lon"]);
        assert_eq!(c.rate_keys(), ["loc.lon"]);
        let r = vec![("loc.lon".to_string(), 0.5)];
        assert!(eval("loc.lat > 55.5", json!({"loc.lat": 55.9}), &[]));
        assert!(!eval("loc.lat > 55.5", json!({"loc.lat": 55.1}), &[]));
        assert!(eval(
            c.source(),
            json!({"loc.lat": 55.9, "loc.lon": -3.2}),
            &r
        ));
        assert!(c.reads_any(json!({"loc.lat": 1}).as_object().unwrap()));
        assert!(!c.reads_any(json!({"loc": 1}).as_object().unwrap()));
        // Through CEL (not the fast path) too, and deeper.
        let cel = "a.b.c.d == 'x' || size(gps.status) > 2";
        assert!(!Condition::compile(cel).unwrap().is_fast());
        assert!(eval(cel, json!({"a.b.c.d": "x"}), &[]));
        assert!(eval(cel, json!({"gps.status": "fix"}), &[]));
        assert!(!eval(cel, json!({"gps.status": "no"}), &[]));
        // The record scope used on the ingestion path holds the dotted names as they are.
        let cond = Condition::compile("gps.status == 'fix'").unwrap();
        let status = crate::ingest::Value::Text("fix".into());
        let values = [("gps.status", &status)];
        assert!(with_record_scope(
            values.into_iter(),
            std::iter::empty(),
            |s| cond.eval(s)
        ));
    }

    #[test]
    fn keys_include_rate_keys() {
        let c = Condition::compile("rate(temperature) > 0.5 && humidity < 20").unwrap();
        assert_eq!(c.keys(), ["humidity", "temperature"]);
        assert_eq!(c.rate_keys(), ["temperature"]);
        assert!(c.reads_any(json!({"temperature": 1}).as_object().unwrap()));
        assert!(!c.reads_any(json!({"battery": 1}).as_object().unwrap()));
    }

    #[test]
    fn rate_reads_the_rate_variable() {
        let c = "rate(temperature) > 0.5";
        let r = |x: f64| vec![("temperature".to_string(), x)];
        assert!(eval(c, json!({"temperature": 40}), &r(1.0)));
        assert!(!eval(c, json!({"temperature": 40}), &r(0.1)));
        assert!(
            !eval(c, json!({"temperature": 40}), &[]),
            "no previous record: false"
        );
    }

    #[test]
    fn invalid_conditions_name_line_and_column() {
        let e = Condition::compile("temperature > ").unwrap_err();
        assert!(e.0.contains("line 1 column 15"), "{e}");
        let e = Condition::compile("temperature >\n  > 3").unwrap_err();
        assert!(e.0.contains("line 2 column 3"), "{e}");
        let e = Condition::compile("a && (b").unwrap_err();
        assert!(e.0.contains("line 1 column"), "{e}");
        assert!(Condition::compile("   ").is_err());
        assert!(Condition::compile("rate(1 + 2) > 3").is_err());
        assert!(Condition::compile(&"a".repeat(5000)).is_err());
    }

    #[test]
    fn hostile_shapes_are_refused_before_parsing() {
        let deep = format!("{}a{}", "(".repeat(500), ")".repeat(500));
        assert!(Condition::compile(&deep).unwrap_err().0.contains("nests"));
        let long = vec!["a > 1"; 300].join(" && ");
        assert!(Condition::compile(&long).is_err());
        assert!(Condition::compile(&"!".repeat(1000)).is_err());
        assert!(Condition::compile(&format!("{}1", "-".repeat(1000))).is_err());
        let ok = format!("{}a > 1{}", "(".repeat(30), ")".repeat(30));
        assert!(
            Condition::compile(&ok).is_ok(),
            "parentheses add no depth to the tree"
        );
        let chain = format!("{} > 1", vec!["a"; 30].join(" + "));
        assert!(Condition::compile(&chain).unwrap_err().0.contains("deeper"));
        assert!(Condition::compile("{'a': 1}['a'] == t").is_err());
        assert!(Condition::compile("mode == '((((((((((((((((((((((((((((((((((((('").is_ok());
    }
}
