//! Properties of filter coverage and overlap (used by access rules) checked against plain
//! matching over a small alphabet, where every topic can be enumerated.

use proptest::prelude::*;
use stratus_mqtt::topic::{filter_covers, filters_overlap, is_valid_topic_filter, matches};

fn level() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("a"), Just("b"), Just(""), Just("+"), Just("#")]
}

fn filter() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..4)
        .prop_map(|l| l.join("/"))
        .prop_filter("valid filter", |f| is_valid_topic_filter(f))
}

/// Every topic name of up to 4 levels over {a, b, ""}.
fn all_topics() -> Vec<String> {
    let mut out = Vec::new();
    let mut layer = vec![String::new()];
    for depth in 1..=4 {
        let mut next = Vec::new();
        for prefix in &layer {
            for l in ["a", "b", ""] {
                next.push(if depth == 1 {
                    l.to_string()
                } else {
                    format!("{prefix}/{l}")
                });
            }
        }
        out.extend(next.iter().cloned());
        layer = next;
    }
    out
}

proptest! {
    #[test]
    fn coverage_agrees_with_matching(outer in filter(), inner in filter()) {
        let topics = all_topics();
        // Filters of at most 3 levels: topics of 4 levels decide `#` against deeper ones.
        let really = topics.iter().all(|t| !matches(&inner, t) || matches(&outer, t));
        prop_assert_eq!(filter_covers(&outer, &inner), really, "{} covers {}", outer, inner);
    }

    #[test]
    fn overlap_agrees_with_matching(a in filter(), b in filter()) {
        let topics = all_topics();
        let really = topics.iter().any(|t| matches(&a, t) && matches(&b, t));
        prop_assert_eq!(filters_overlap(&a, &b), really, "{} overlaps {}", a, b);
    }
}
