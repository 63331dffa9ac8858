//! Rule conditions: CEL expressions over one telemetry record, compiled once, evaluated per
//! record with the record's keys as variables and `rate(key)` as the per-second change of a
//! key since the device's previous record.
//!
//! A condition is true only when it evaluates to the boolean `true`. A key the record does
//! not have, a type mismatch (`"on" > 3`) or any other evaluation error makes it false, never
//! an error: devices send what they send.

use std::collections::BTreeSet;

use cel::common::ast::{CallExpr, Expr, IdedExpr};
use cel::{Context, Program, Value};
use serde_json::{Map, Value as Json};

/// Longest accepted condition, in bytes.
pub const MAX_CONDITION_LEN: usize = 4096;

/// A condition that did not compile; the text names the line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConditionError(pub String);

/// A compiled condition.
#[derive(Debug, Clone)]
pub struct Condition {
    source: String,
    expr: IdedExpr,
    keys: Vec<String>,
    rate_keys: Vec<String>,
}

/// The variable name `rate(key)` is evaluated from.
pub fn rate_variable(key: &str) -> String {
    format!("rate({key})")
}

impl Condition {
    /// Compiles `source`.
    pub fn compile(source: &str) -> Result<Condition, ConditionError> {
        if source.trim().is_empty() {
            return Err(ConditionError("the condition is empty".into()));
        }
        if source.len() > MAX_CONDITION_LEN {
            return Err(ConditionError(format!(
                "the condition must be at most {MAX_CONDITION_LEN} bytes"
            )));
        }
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
        let mut rate_keys = BTreeSet::new();
        rewrite_rates(&mut expr, &mut rate_keys)?;
        let references = program.references();
        let mut keys: BTreeSet<String> = references
            .variables()
            .into_iter()
            .map(str::to_owned)
            .collect();
        keys.extend(rate_keys.iter().cloned());
        Ok(Condition {
            source: source.to_owned(),
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

    /// Evaluates against a scope built by [`Scope::new`].
    pub fn eval(&self, scope: &Context<'_, '_>) -> bool {
        matches!(Value::resolve(&self.expr, scope), Ok(Value::Bool(true)))
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

    fn eval(cond: &str, values: Json, rates: &[(String, f64)]) -> bool {
        let c = Condition::compile(cond).unwrap();
        let Json::Object(values) = values else {
            panic!("values must be an object")
        };
        with_scope(&values, rates, |s| c.eval(s))
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
}
