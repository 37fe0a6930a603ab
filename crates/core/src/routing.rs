//! Route matching by method and path template.
//!
//! A template is a sequence of whole segments, each a literal or a `{name}` parameter:
//! `/orders/{tenant}/items`. Matching works on the raw request path split at `/`, and each
//! segment is percent-decoded afterwards, so `%2F` inside a segment stays part of that
//! segment's value instead of splitting it. A trailing slash is ignored (`/orders/` matches
//! `/orders`). Where a literal and a parameter could both match, the literal wins, segment by
//! segment from the left; two templates of the same shape for the same method are a policy
//! error, so the answer never depends on the order of routes.

use serde::{Deserialize, Serialize};

use crate::policy::model::{Method, Route};

/// One segment of a path template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Segment {
    Literal(String),
    Param(String),
}

/// A parsed path template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathTemplate {
    pub segments: Vec<Segment>,
}

impl PathTemplate {
    /// Parses `/a/{b}/c`. The error names what was expected.
    pub fn parse(text: &str) -> Result<PathTemplate, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("a path starting with '/', got \"{text}\""));
        };
        if text.contains(['?', '#']) {
            return Err(format!("a path without query or fragment, got \"{text}\""));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        if rest.is_empty() {
            return Ok(PathTemplate { segments });
        }
        for raw in rest.split('/') {
            let seg = if let Some(name) = raw.strip_prefix('{').and_then(|r| r.strip_suffix('}')) {
                if !is_param_name(name) {
                    return Err(format!(
                        "parameter names of lowercase letters, digits and '_' starting with a letter, got {{{name}}} in \"{text}\""
                    ));
                }
                if segments.contains(&Segment::Param(name.to_owned())) {
                    return Err(format!(
                        "each parameter once, got {{{name}}} twice in \"{text}\""
                    ));
                }
                Segment::Param(name.to_owned())
            } else if raw.is_empty() {
                return Err(format!("no empty segment ('//'), got \"{text}\""));
            } else if raw.contains(['{', '}']) {
                return Err(format!(
                    "parameters that fill a whole segment, like /{{name}}/, got \"{raw}\" in \"{text}\""
                ));
            } else {
                let decoded = percent_decode(raw)
                    .ok_or_else(|| format!("valid percent-encoding in \"{raw}\" of \"{text}\""))?;
                if decoded == "." || decoded == ".." {
                    return Err(format!("no '.' or '..' segment, got \"{text}\""));
                }
                Segment::Literal(decoded)
            };
            segments.push(seg);
        }
        Ok(PathTemplate { segments })
    }

    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(p) => Some(p.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Whether two templates match exactly the same paths (parameter names aside).
    pub fn same_shape(&self, other: &PathTemplate) -> bool {
        self.shape() == other.shape()
    }

    /// The template with parameter names left out (`None` for a parameter, the decoded text
    /// for a literal): two shapes are equal exactly when the templates have the same shape,
    /// so it can key a map of routes.
    pub fn shape(&self) -> Vec<Option<&str>> {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => Some(l.as_str()),
                Segment::Param(_) => None,
            })
            .collect()
    }

    /// Matches decoded request segments; on success, the parameters in template order.
    fn matches(&self, segments: &[String]) -> Option<Vec<(String, String)>> {
        if segments.len() != self.segments.len() {
            return None;
        }
        let mut params = Vec::new();
        for (seg, value) in self.segments.iter().zip(segments) {
            match seg {
                Segment::Literal(l) if l == value => {}
                Segment::Literal(_) => return None,
                // An empty segment (`//`) fills no parameter.
                Segment::Param(_) if value.is_empty() => return None,
                Segment::Param(name) => params.push((name.clone(), value.clone())),
            }
        }
        Some(params)
    }

    /// Ranks templates for one path: literals before parameters, segment by segment.
    fn specificity(&self) -> Vec<bool> {
        self.segments
            .iter()
            .map(|s| matches!(s, Segment::Param(_)))
            .collect()
    }
}

fn is_param_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.len() <= 64
}

/// Decodes `%XX` escapes; `None` for a malformed escape or a result that is not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    // The crate passes a `%` without two hex digits after it through as it is: here it is an
    // error, checked first.
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode(bytes)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
}

/// The routes of a valid policy, ready to match requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Router {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    route: usize,
    methods: Vec<Method>,
    template: PathTemplate,
}

/// The outcome of matching one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch {
    /// The route at this index of `policy.routes`, with its path parameters.
    Found {
        route: usize,
        params: Vec<(String, String)>,
    },
    /// A route has this path but not this method; `allow` lists the methods it has.
    MethodNotAllowed { allow: Vec<Method> },
    /// No route has this path.
    NotFound,
    /// The path is not valid percent-encoded UTF-8.
    BadPath,
}

impl Router {
    /// Builds a router from validated routes. A template that does not parse (impossible after
    /// validation) makes its route unreachable rather than panicking.
    pub fn new(routes: &[Route]) -> Router {
        let mut entries: Vec<Entry> = routes
            .iter()
            .enumerate()
            .filter_map(|(route, r)| {
                let template = PathTemplate::parse(&r.path).ok()?;
                Some(Entry {
                    route,
                    methods: r.methods.clone(),
                    template,
                })
            })
            .collect();
        // Stable, so templates of equal rank keep the order of the policy.
        entries.sort_by_cached_key(|e| e.template.specificity());
        Router { entries }
    }

    /// Matches a method (as sent) and a raw path (without the query string).
    pub fn find(&self, method: &str, raw_path: &str) -> RouteMatch {
        let Some(segments) = split_path(raw_path) else {
            return RouteMatch::BadPath;
        };
        let mut allow: Vec<Method> = Vec::new();
        for entry in &self.entries {
            let Some(params) = entry.template.matches(&segments) else {
                continue;
            };
            if entry.methods.iter().any(|m| m.as_str() == method) {
                return RouteMatch::Found {
                    route: entry.route,
                    params,
                };
            }
            allow.extend(&entry.methods);
        }
        if allow.is_empty() {
            RouteMatch::NotFound
        } else {
            allow.sort();
            allow.dedup();
            RouteMatch::MethodNotAllowed { allow }
        }
    }
}

/// Splits a raw path into decoded segments, ignoring one trailing slash.
fn split_path(raw: &str) -> Option<Vec<String>> {
    let rest = raw.strip_prefix('/').unwrap_or(raw);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Some(Vec::new());
    }
    rest.split('/').map(percent_decode).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_errors_say_what_was_expected() {
        let err = |t| PathTemplate::parse(t).unwrap_err();
        assert!(err("orders").contains("starting with '/'"));
        assert!(err("/a//b").contains("no empty segment"));
        assert!(err("/a/x{id}").contains("whole segment"));
        assert!(err("/a/{Id}").contains("parameter names"));
        assert!(err("/a/{id}/{id}").contains("twice"));
        assert!(err("/a?b=1").contains("without query"));
        assert!(err("/a/%zz").contains("percent-encoding"));
        assert!(err("/a/..").contains("'..'"));
    }

    #[test]
    fn shapes_compare_literals_and_ignore_parameter_names() {
        let t = |s| PathTemplate::parse(s).unwrap();
        assert!(t("/orders/{id}").same_shape(&t("/orders/{tenant}")));
        assert!(!t("/orders/{id}").same_shape(&t("/orders/new")));
        assert!(t("/a/b/").same_shape(&t("/a/b")));
    }
}
