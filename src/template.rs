//! Value templates: how a route builds a blob name, a message property or a header from the
//! request, e.g. `{path.tenant}/{date:%Y/%m/%d}/{uuid}.json`.
//!
//! Parsing happens once, when the policy is validated; a template that names something that
//! cannot exist is a policy error, not a surprise at request time. `{{` and `}}` stand for
//! literal braces.

use std::fmt;

/// A parsed template: literal text and variables, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    Var(Var),
}

/// What a template variable is filled from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Var {
    /// A parameter of the route's path template.
    Path(String),
    /// A query-string parameter.
    Query(String),
    /// A request header (names are case-insensitive; stored lowercase).
    Header(String),
    /// A fresh random UUID.
    Uuid,
    /// The request id (`x-request-id`).
    RequestId,
    /// The current UTC time, formatted with `%Y %m %d %H %M %S` (and `%%`).
    Date(String),
}

impl fmt::Display for Var {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Var::Path(n) => write!(f, "{{path.{n}}}"),
            Var::Query(n) => write!(f, "{{query.{n}}}"),
            Var::Header(n) => write!(f, "{{header.{n}}}"),
            Var::Uuid => f.write_str("{uuid}"),
            Var::RequestId => f.write_str("{request_id}"),
            Var::Date(fmt_) => write!(f, "{{date:{fmt_}}}"),
        }
    }
}

/// The variables a template may use, for error messages.
pub const EXPECTED_VARS: &str =
    "path.NAME, query.NAME, header.NAME, uuid, request_id or date:FORMAT";

impl Template {
    /// Parses a template. The error says what was expected at the first bad spot.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, n)| n) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, n)| n) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        format!("a closing '}}' for the '{{' at character {i} (write '{{{{' for a literal brace)")
                    })?;
                    let var = parse_var(&rest[..end])?;
                    // Skip the variable's characters and its closing brace.
                    for _ in 0..rest[..=end].chars().count() {
                        chars.next();
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Var(var));
                }
                '}' => {
                    return Err(format!(
                        "no lone '}}' (at character {i}; write '}}}}' for a literal brace)"
                    ))
                }
                _ => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template { parts })
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v),
            Part::Literal(_) => None,
        })
    }

    pub fn literals(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Literal(l) => Some(l.as_str()),
            Part::Var(_) => None,
        })
    }
}

fn parse_var(inner: &str) -> Result<Var, String> {
    let named = |source: &str, name: &str, make: fn(String) -> Var| {
        if is_token(name) {
            Ok(make(name.to_owned()))
        } else {
            Err(format!(
                "a name after '{source}.' (letters, digits, '-', '_'), got {{{inner}}}"
            ))
        }
    };
    if let Some(fmt_) = inner.strip_prefix("date:") {
        return check_date_format(fmt_).map(|()| Var::Date(fmt_.to_owned()));
    }
    match inner.split_once('.') {
        Some(("path", name)) => named("path", name, Var::Path),
        Some(("query", name)) => named("query", name, Var::Query),
        Some(("header", name)) => named("header", &name.to_ascii_lowercase(), Var::Header),
        None if inner == "uuid" => Ok(Var::Uuid),
        None if inner == "request_id" => Ok(Var::RequestId),
        _ => Err(format!("one of {EXPECTED_VARS}, got {{{inner}}}")),
    }
}

fn check_date_format(fmt_: &str) -> Result<(), String> {
    let mut chars = fmt_.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            match chars.next() {
                Some('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | '%') => {}
                other => {
                    return Err(format!(
                        "a date format using %Y %m %d %H %M %S or %%, got %{} in {{date:{fmt_}}}",
                        other.map(String::from).unwrap_or_default()
                    ))
                }
            }
        }
    }
    Ok(())
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_literals_variables_and_escaped_braces() {
        let t = Template::parse("a{{b}}/{path.tenant}/{date:%Y/%m}/{uuid}{header.X-Id}").unwrap();
        assert_eq!(
            t.parts,
            vec![
                Part::Literal("a{b}/".into()),
                Part::Var(Var::Path("tenant".into())),
                Part::Literal("/".into()),
                Part::Var(Var::Date("%Y/%m".into())),
                Part::Literal("/".into()),
                Part::Var(Var::Uuid),
                Part::Var(Var::Header("x-id".into())),
            ]
        );
    }

    #[test]
    fn rejects_unknown_sources_unclosed_braces_and_bad_dates() {
        assert!(Template::parse("{body.x}")
            .unwrap_err()
            .contains("got {body.x}"));
        assert!(Template::parse("{path.x").unwrap_err().contains("closing"));
        assert!(Template::parse("x}").unwrap_err().contains("lone"));
        assert!(Template::parse("{path.}")
            .unwrap_err()
            .contains("a name after 'path.'"));
        assert!(Template::parse("{date:%Q}").unwrap_err().contains("got %Q"));
    }
}
