//! The URL of an `azure_rest` route: a template parsed at build time (what the prepared policy
//! holds), rendered per request with every caller value percent-encoded.

use serde::{Deserialize, Serialize};

use crate::problem::Problem;
use crate::template::{render_var, RenderContext, Template, Var};

/// A URL template, parsed at build time: a fixed origin, path segments and query values that
/// are either fixed or one whole variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestUrl {
    /// `scheme://host[:port]`, as written.
    pub origin: String,
    pub host: String,
    pub segments: Vec<UrlPart>,
    pub query: Vec<(String, UrlPart)>,
    /// The URL ended with `/`.
    pub trailing_slash: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UrlPart {
    /// Fixed text, already valid in its place.
    Fixed(String),
    Var(Var),
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether fixed text is valid in a path segment or query part as it is (RFC 3986 pchar,
/// `%XX` escapes included, plus `/` and `?` in query values).
fn is_fixed_text(text: &str, query: bool) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
            if !(hex(i + 1) && hex(i + 2)) {
                return false;
            }
            i += 3;
            continue;
        }
        let ok = is_unreserved(b)
            || b"!$'()*+,;:@".contains(&b)
            || (query && matches!(b, b'/' | b'?'))
            || (!query && matches!(b, b'=' | b'&'));
        if !ok {
            return false;
        }
        i += 1;
    }
    true
}

fn part(text: &str, query: bool, what: &str) -> Result<UrlPart, String> {
    if text.contains(['{', '}']) {
        let template = Template::parse(text)?;
        return match template.parts.as_slice() {
            [crate::template::Part::Var(var)] => {
                if matches!(var, Var::Body | Var::BodyBase64) {
                    Err(format!("no {var} in the URL (it may only be used in a body template)"))
                } else {
                    Ok(UrlPart::Var(var.clone()))
                }
            }
            _ => Err(format!(
                "a {what} that is fixed text or one whole variable such as {{path.name}}, got \"{text}\""
            )),
        };
    }
    if !is_fixed_text(text, query) {
        return Err(format!(
            "a {what} of URL characters (percent-encode others), got \"{text}\""
        ));
    }
    Ok(UrlPart::Fixed(text.to_owned()))
}

impl RestUrl {
    /// Parses a URL template. The error says what was expected.
    pub fn parse(url: &str) -> Result<RestUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("an absolute https:// URL, got \"{url}\""))?;
        if !matches!(scheme, "https" | "http") {
            return Err(format!("an https:// URL, got \"{url}\""));
        }
        if url.contains('#') {
            return Err(format!("a URL without a fragment ('#'), got \"{url}\""));
        }
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if authority.contains(['{', '}']) {
            return Err(format!(
                "a URL whose host is fixed: template variables may fill path segments and query values only, got \"{url}\""
            ));
        }
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split_once(']').map(|(h, _)| h),
            None => Some(authority.rsplit_once(':').map_or(authority, |(h, _)| h)),
        }
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        })
        .ok_or_else(|| {
            format!("a URL with a plain host name or address and no user info, got \"{url}\"")
        })?;
        let after = &rest[authority_end..];
        let (path, query) = after.split_once('?').unwrap_or((after, ""));
        let mut segments = Vec::new();
        let trailing_slash = path.len() > 1 && path.ends_with('/');
        let inner = path.trim_start_matches('/');
        let inner = inner.strip_suffix('/').unwrap_or(inner);
        if !inner.is_empty() {
            for segment in inner.split('/') {
                if segment.is_empty() || segment == "." || segment == ".." {
                    return Err(format!(
                        "a path without empty, '.' or '..' segments, got \"{path}\""
                    ));
                }
                segments.push(part(segment, false, "path segment")?);
            }
        }
        let mut pairs = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name.contains(['{', '}']) || !is_fixed_text(name, true) || name.is_empty() {
                return Err(format!(
                    "query parameter names that are fixed text, got \"{name}\""
                ));
            }
            if name.eq_ignore_ascii_case("api-version") {
                return Err(
                    "no api-version in the URL: set \"api_version\" (it is pinned and checked)"
                        .to_owned(),
                );
            }
            pairs.push((name.to_owned(), part(value, true, "query value")?));
        }
        Ok(RestUrl {
            origin: format!("{scheme}://{authority}"),
            host: host.to_ascii_lowercase(),
            segments,
            query: pairs,
            trailing_slash,
        })
    }

    /// The variables the URL uses.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.segments
            .iter()
            .chain(self.query.iter().map(|(_, p)| p))
            .filter_map(|p| match p {
                UrlPart::Var(v) => Some(v),
                UrlPart::Fixed(_) => None,
            })
    }

    /// The URL's shape for people: `{path.site}` where a caller value goes.
    pub fn shape(&self) -> String {
        let mut out = self.origin.clone();
        for segment in &self.segments {
            out.push('/');
            match segment {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(v) => out.push_str(&v.to_string()),
            }
        }
        if self.trailing_slash {
            out.push('/');
        }
        for (i, (name, value)) in self.query.iter().enumerate() {
            out.push(if i == 0 { '?' } else { '&' });
            out.push_str(name);
            out.push('=');
            match value {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(v) => out.push_str(&v.to_string()),
            }
        }
        out
    }

    /// The URL for one request: every caller value percent-encoded; a path value that is
    /// empty, `.` or `..`, or holds `/` or `\`, is refused (it would change the path's shape).
    pub fn render(
        &self,
        ctx: &RenderContext,
        extra_query: &[(&str, &str)],
    ) -> Result<String, Problem> {
        let mut out = self.origin.clone();
        for segment in &self.segments {
            out.push('/');
            match segment {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(var) => {
                    let value = render_var(var, ctx).map_err(|m| missing(&m))?;
                    if value.is_empty()
                        || value == "."
                        || value == ".."
                        || value.contains(['/', '\\'])
                    {
                        return Err(bad_path_value(var));
                    }
                    percent_encode(&value, &mut out);
                }
            }
        }
        if self.trailing_slash {
            out.push('/');
        }
        let mut first = true;
        let mut sep = |out: &mut String| {
            out.push(if first { '?' } else { '&' });
            first = false;
        };
        for (name, value) in &self.query {
            sep(&mut out);
            out.push_str(name);
            out.push('=');
            match value {
                UrlPart::Fixed(t) => out.push_str(t),
                UrlPart::Var(var) => {
                    let value = render_var(var, ctx).map_err(|m| missing(&m))?;
                    percent_encode(&value, &mut out);
                }
            }
        }
        for (name, value) in extra_query {
            sep(&mut out);
            percent_encode(name, &mut out);
            out.push('=');
            percent_encode(value, &mut out);
        }
        Ok(out)
    }
}

/// Percent-encodes every byte but RFC 3986's unreserved characters.
pub fn percent_encode(value: &str, out: &mut String) {
    crate::encoding::push_percent_encoded(out, value);
}

/// A value a request template needs is not in the request.
pub(super) fn missing(what: &str) -> Problem {
    Problem::new(
        400,
        "missing-request-value",
        "The request lacks a value this route needs",
        format!("This route builds its Azure request from the request, but {what}."),
    )
}

fn bad_path_value(var: &Var) -> Problem {
    Problem::new(
        400,
        "bad-path-value",
        "A value cannot be used as a path segment",
        format!("The value of {var} fills one segment of the Azure URL: it must not be empty, '.' or '..', nor contain '/' or '\\'. Nothing was sent."),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx_render(url: &RestUrl, params: &[(&str, &str)]) -> Result<String, Problem> {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let header = |_: &str| None;
        let uuid = || "u".to_owned();
        let ctx = RenderContext {
            path: &params,
            query: &[],
            header: &header,
            request_id: "r",
            uuid: &uuid,
            now_ms: 0.0,
            jwt: None,
            body: None,
        };
        url.render(&ctx, &[("api-version", "2022-09-01")])
    }

    #[test]
    fn caller_values_fill_whole_segments_encoded_and_never_change_the_shape() {
        let url = RestUrl::parse(
            "https://management.azure.com/subscriptions/{path.sub}/sites/{path.site}/restart?x={path.q}",
        )
        .unwrap();
        assert_eq!(
            ctx_render(&url, &[("sub", "s1"), ("site", "a b?#%2F"), ("q", "1&y=2")]).unwrap(),
            "https://management.azure.com/subscriptions/s1/sites/a%20b%3F%23%252F/restart?x=1%26y%3D2&api-version=2022-09-01"
        );
        for bad in ["a/b", "..", ".", "", "a\\b"] {
            let p = ctx_render(&url, &[("sub", "s"), ("site", bad), ("q", "")]).unwrap_err();
            assert_eq!(p.kind, "bad-path-value", "{bad:?}");
        }
    }

    #[test]
    fn url_templates_keep_the_host_fixed() {
        let err = |u| RestUrl::parse(u).unwrap_err();
        assert!(err("https://{path.h}.vault.azure.net/secrets").contains("host is fixed"));
        assert!(err("https://management.azure.com/a{path.x}").contains("one whole variable"));
        assert!(err("https://management.azure.com/a/../b").contains("'..'"));
        assert!(err("https://management.azure.com/a?api-version=1").contains("api_version"));
        assert!(err("https://management.azure.com/a#f").contains("fragment"));
        assert!(err("https://management.azure.com/{body}").contains("body template"));
        let ok =
            RestUrl::parse("https://graph.microsoft.com/v1.0/users/{jwt.oid}?$select=id").unwrap();
        assert_eq!(ok.host, "graph.microsoft.com");
        assert_eq!(
            ok.shape(),
            "https://graph.microsoft.com/v1.0/users/{jwt.oid}?$select=id"
        );
    }
}
