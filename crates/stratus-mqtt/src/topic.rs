//! Topic names and topic filters: validation (MQTT 3.1.1 §4.7) and matching of one name against one filter.

/// True when `name` may be used as the topic of a PUBLISH: non-empty and free of `+` and `#`
/// (MQTT-4.7.3-1, MQTT-3.3.2-2). Length and UTF-8 are checked by the codec.
pub fn is_valid_topic_name(name: &str) -> bool {
    !name.is_empty() && !name.bytes().any(|b| b == b'+' || b == b'#')
}

/// True when `filter` is a valid topic filter: non-empty; `#` only as the whole last level
/// (MQTT-4.7.1-2); `+` only as a whole level (MQTT-4.7.1-3).
pub fn is_valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let is_last = levels.peek().is_none();
        match level {
            "#" if is_last => {}
            "+" => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Splits a shared subscription filter `$share/{group}/{filter}` (MQTT 5.0 §4.8.2) into group
/// and filter. `None` when `filter` is not a shared subscription; `Some(Err(()))` when it starts
/// with `$share/` but the group name is empty or has a wildcard, or the filter is invalid.
#[allow(clippy::result_unit_err)]
pub fn split_shared(filter: &str) -> Option<Result<(&str, &str), ()>> {
    let rest = filter.strip_prefix("$share/")?;
    Some(match rest.split_once('/') {
        Some((group, inner))
            if !group.is_empty() && !group.contains(['+', '#']) && is_valid_topic_filter(inner) =>
        {
            Ok((group, inner))
        }
        _ => Err(()),
    })
}

/// Number of levels in a topic name or filter (`a/b` has 2, `/` has 2).
pub fn level_count(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

/// True when the topic `name` matches `filter`. Both must be valid. Topics starting with `$`
/// are not matched by a filter starting with a wildcard (MQTT-4.7.2-1).
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every topic name `inner` matches is also matched by `outer` (both valid
/// filters): `a/#` covers `a/+/b` and `a`, `a/+` does not cover `a/#`.
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    if inner == "#" && outer == "+/#" {
        // Every topic has a first level, so `+/#` matches all that `#` does.
        return true;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(ol), Some(il)) if ol == il && il != "+" => {}
            (None, None) => return true,
            // `x/#` also matches `x` itself.
            (Some(ol), None) => return ol == "#",
            _ => return false,
        }
    }
}

/// True when some topic name is matched by both filters (both valid).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(l), Some(r)) if l == r => {}
            (None, None) => return true,
            (Some(rest), None) | (None, Some(rest)) => return rest == "#",
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_of_one_filter_by_another() {
        for (outer, inner) in [
            ("#", "a/b"),
            ("#", "#"),
            ("a/#", "a"),
            ("a/#", "a/+/b"),
            ("a/#", "a/#"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("+/+", "a/b"),
            ("a/b", "a/b"),
        ] {
            assert!(filter_covers(outer, inner), "{outer} covers {inner}");
        }
        for (outer, inner) in [
            ("a/+", "a/#"),
            ("a/b", "a/+"),
            ("a/b", "a/b/c"),
            ("a/b/c", "a/b"),
            ("a/+/#", "a/#"),
            ("a", "#"),
            ("b/#", "a/b"),
        ] {
            assert!(
                !filter_covers(outer, inner),
                "{outer} does not cover {inner}"
            );
        }
    }

    #[test]
    fn overlap_of_two_filters() {
        for (a, b) in [
            ("#", "secret/x"),
            ("a/+", "+/b"),
            ("a/#", "a"),
            ("+/+/c", "a/#"),
            ("a/b", "a/b"),
        ] {
            assert!(filters_overlap(a, b) && filters_overlap(b, a), "{a} ~ {b}");
        }
        for (a, b) in [
            ("a/+", "b/+"),
            ("a/b", "a/b/c"),
            ("a/+", "a/b/c"),
            ("+", "a/b"),
        ] {
            assert!(
                !filters_overlap(a, b) && !filters_overlap(b, a),
                "{a} !~ {b}"
            );
        }
    }

    #[test]
    fn filter_validation_follows_section_4_7() {
        for ok in [
            "#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "/#", "$SYS/#", "sport/+",
        ] {
            assert!(is_valid_topic_filter(ok), "{ok} should be valid");
        }
        for bad in ["", "a/#/b", "a+", "a/b#", "#/a", "+a/b", "a/+b", "##"] {
            assert!(!is_valid_topic_filter(bad), "{bad} should be invalid");
        }
    }

    #[test]
    fn shared_subscription_filters_split_into_group_and_filter() {
        assert_eq!(split_shared("a/b"), None);
        assert_eq!(split_shared("$share/g/a/#"), Some(Ok(("g", "a/#"))));
        assert_eq!(split_shared("$share/g"), Some(Err(())));
        assert_eq!(split_shared("$share//a"), Some(Err(())));
        assert_eq!(split_shared("$share/g+/a"), Some(Err(())));
        assert_eq!(split_shared("$share/g/a/#/b"), Some(Err(())));
    }

    #[test]
    fn topic_name_validation() {
        assert!(is_valid_topic_name("a/b"));
        assert!(is_valid_topic_name("/"));
        assert!(!is_valid_topic_name(""));
        assert!(!is_valid_topic_name("a/+"));
        assert!(!is_valid_topic_name("a/#"));
    }

    #[test]
    fn matching_follows_the_specification_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("#", "a/b/c"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn dollar_topics_are_not_matched_by_leading_wildcards() {
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/broker/uptime", "$SYS/broker/uptime"));
        assert!(matches("$SYS/#", "$SYS/broker/uptime"));
        assert!(matches("$SYS/broker/+", "$SYS/broker/uptime"));
    }
}
