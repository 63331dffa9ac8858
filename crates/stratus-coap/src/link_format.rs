//! The CoRE Link Format (RFC 6690) for `/.well-known/core`: resource descriptions, rendering,
//! and query filtering (§4.1).
//!
//! ```
//! use stratus_coap::link_format::{well_known_core, LinkResource};
//! let resources = [
//!     LinkResource::new("/config").rt("stratus.config").interface("core.p").ct(50).observable(),
//!     LinkResource::new("/telemetry").rt("stratus.telemetry").ct(50),
//! ];
//! assert_eq!(
//!     well_known_core(&resources, &["rt=stratus.conf*"]),
//!     r#"</config>;rt="stratus.config";if="core.p";ct=50;obs"#
//! );
//! ```
//!
//! ## Filtering
//! Each query item `name=value` keeps the links whose attribute `name` matches `value`; `href`
//! matches the link target. A value ending in `*` is a prefix match. For attributes that hold
//! a space-separated list (`rt`, `if`, `ct`), a link matches when any one of its
//! values matches. An item without `=` (`?obs`) keeps links that carry the attribute at all.
//! RFC 6690 requires one search parameter; several are combined with AND. Query items that are
//! not link filters (an access token, say) must be removed by the caller first.

use std::fmt::Write as _;

/// One link in a `/.well-known/core` document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkResource {
    /// Target path (`/sensors/temp`).
    pub href: String,
    /// Resource types (`rt`).
    pub rt: Vec<String>,
    /// Interface descriptions (`if`).
    pub interfaces: Vec<String>,
    /// Content-Formats (`ct`).
    pub ct: Vec<u16>,
    /// Observable (`obs`, RFC 7641 §6).
    pub obs: bool,
    /// Maximum size estimate in bytes (`sz`).
    pub sz: Option<u64>,
    /// Human-readable title.
    pub title: Option<String>,
}

impl LinkResource {
    /// A link to `href` with no attributes.
    pub fn new(href: impl Into<String>) -> Self {
        LinkResource {
            href: href.into(),
            ..Default::default()
        }
    }

    /// Adds a resource type.
    pub fn rt(mut self, rt: impl Into<String>) -> Self {
        self.rt.push(rt.into());
        self
    }

    /// Adds an interface description.
    pub fn interface(mut self, iface: impl Into<String>) -> Self {
        self.interfaces.push(iface.into());
        self
    }

    /// Adds a Content-Format.
    pub fn ct(mut self, ct: u16) -> Self {
        self.ct.push(ct);
        self
    }

    /// Marks the resource observable.
    pub fn observable(mut self) -> Self {
        self.obs = true;
        self
    }

    /// Sets the size estimate.
    pub fn size(mut self, sz: u64) -> Self {
        self.sz = Some(sz);
        self
    }

    /// Sets the title.
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Writes the link in link-format syntax.
    fn render_into(&self, out: &mut String) {
        out.push('<');
        encode_href(&self.href, out);
        out.push('>');
        if !self.rt.is_empty() {
            quoted(out, "rt", &self.rt.join(" "));
        }
        if !self.interfaces.is_empty() {
            quoted(out, "if", &self.interfaces.join(" "));
        }
        match self.ct.as_slice() {
            [] => {}
            [one] => {
                let _ = write!(out, ";ct={one}");
            }
            many => {
                let list: Vec<String> = many.iter().map(u16::to_string).collect();
                quoted(out, "ct", &list.join(" "));
            }
        }
        if self.obs {
            out.push_str(";obs");
        }
        if let Some(sz) = self.sz {
            let _ = write!(out, ";sz={sz}");
        }
        if let Some(title) = &self.title {
            quoted(out, "title", title);
        }
    }

    /// The values of attribute `name`, as the filter compares them; `None` when absent.
    fn attribute(&self, name: &str) -> Option<Vec<String>> {
        let values = match name {
            "href" => vec![self.href.clone()],
            "rt" => self.rt.clone(),
            "if" => self.interfaces.clone(),
            "ct" => self.ct.iter().map(u16::to_string).collect(),
            "obs" => {
                if self.obs {
                    vec![String::new()]
                } else {
                    vec![]
                }
            }
            "sz" => self.sz.map(|s| s.to_string()).into_iter().collect(),
            "title" => self.title.clone().into_iter().collect(),
            _ => vec![],
        };
        (!values.is_empty()).then_some(values)
    }

    /// Whether this link passes one query item (§4.1).
    pub fn matches(&self, query: &str) -> bool {
        let (name, value) = match query.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (query, None),
        };
        let Some(values) = self.attribute(name) else {
            return false;
        };
        let Some(pattern) = value else {
            return true;
        };
        values.iter().any(|v| match pattern.strip_suffix('*') {
            Some(prefix) => v.starts_with(prefix),
            None => v == pattern,
        })
    }
}

fn quoted(out: &mut String, name: &str, value: &str) {
    let _ = write!(out, ";{name}=\"");
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Percent-encodes what may not appear inside `<…>` (anything but the RFC 3986 path characters).
fn encode_href(href: &str, out: &mut String) {
    for b in href.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%?#".contains(&b);
        if keep {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// Renders links as an `application/link-format` document (links separated by `,`).
pub fn render<'a>(resources: impl IntoIterator<Item = &'a LinkResource>) -> String {
    let mut out = String::new();
    for (i, r) in resources.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        r.render_into(&mut out);
    }
    out
}

/// The links that pass every query item (all of them when there are none).
pub fn filter<'a, S: AsRef<str>>(
    resources: &'a [LinkResource],
    queries: &[S],
) -> Vec<&'a LinkResource> {
    resources
        .iter()
        .filter(|r| queries.iter().all(|q| r.matches(q.as_ref())))
        .collect()
}

/// The `/.well-known/core` payload for a request with Uri-Query items `queries`.
pub fn well_known_core<S: AsRef<str>>(resources: &[LinkResource], queries: &[S]) -> String {
    render(filter(resources, queries))
}
