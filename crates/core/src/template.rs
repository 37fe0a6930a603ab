//! Value templates: how a route builds a blob name, a message property or a header from the
//! request, e.g. `{path.tenant}/{date:%Y/%m/%d}/{uuid}.json`.
//!
//! Parsing happens once, when the policy is validated; a template that names something that
//! cannot exist is a policy error, not a surprise at request time. `{{` and `}}` stand for
//! literal braces.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A parsed template: literal text and variables, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    Literal(String),
    Var(Var),
}

/// What a template variable is filled from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A claim of the caller's validated JWT (`{jwt.sub}`, `{jwt.oid}`).
    Jwt(String),
    /// The caller's body as UTF-8 text (body templates of `azure_rest` routes only).
    Body,
    /// The caller's body in base64 (body templates of `azure_rest` routes only).
    BodyBase64,
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
            Var::Jwt(n) => write!(f, "{{jwt.{n}}}"),
            Var::Body => f.write_str("{body}"),
            Var::BodyBase64 => f.write_str("{body_base64}"),
        }
    }
}

/// The variables a template may use, for error messages.
pub const EXPECTED_VARS: &str =
    "path.NAME, query.NAME, header.NAME, jwt.CLAIM, uuid, request_id or date:FORMAT";

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

/// What a template is filled from: one request.
pub struct RenderContext<'a> {
    pub path: &'a [(String, String)],
    pub query: &'a [(String, String)],
    /// Looks up a request header by lowercase name.
    pub header: &'a dyn Fn(&str) -> Option<String>,
    pub request_id: &'a str,
    /// A new random UUID each call.
    pub uuid: &'a dyn Fn() -> String,
    pub now_ms: f64,
    /// The claims of the caller's validated JWT, when the route checks one.
    pub jwt: Option<&'a serde_json::Map<String, serde_json::Value>>,
    /// The caller's body, for the body templates that name it.
    pub body: Option<&'a [u8]>,
}

impl Template {
    /// Fills the template. The error names what the request lacks (a caller's mistake: 400).
    pub fn render(&self, ctx: &RenderContext) -> Result<String, String> {
        self.render_escaped(ctx, |value, out| out.push_str(value))
    }

    /// Fills the template, each variable's value written by `escape` (literals as they are).
    pub fn render_escaped(
        &self,
        ctx: &RenderContext,
        mut escape: impl FnMut(&str, &mut String),
    ) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Var(var) => escape(&render_var(var, ctx)?, &mut out),
            }
        }
        Ok(out)
    }

    /// Whether some request could render `text`: its literals, in order, with anything in the
    /// place of each variable (a variable may be empty). Store-and-forward asks it of a stored
    /// blob name before delivering it.
    pub fn could_render(&self, text: &str) -> bool {
        // Wildcard matching: each variable a `*`, each literal character itself. When a
        // literal fails, the last `*` takes one more character and matching resumes after it.
        enum Token {
            Char(char),
            Any,
        }
        let mut pattern = Vec::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => pattern.extend(l.chars().map(Token::Char)),
                Part::Var(_) => pattern.push(Token::Any),
            }
        }
        let text: Vec<char> = text.chars().collect();
        let (mut p, mut t) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while t < text.len() {
            match pattern.get(p) {
                Some(Token::Char(c)) if text.get(t) == Some(c) => {
                    p += 1;
                    t += 1;
                }
                Some(Token::Any) => {
                    star = Some((p, t));
                    p += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        star = Some((sp, st + 1));
                        p = sp + 1;
                        t = st + 1;
                    }
                    None => return false,
                },
            }
        }
        pattern
            .iter()
            .skip(p)
            .all(|token| matches!(token, Token::Any))
    }
}

impl fmt::Display for Template {
    /// The template as it is written in the policy (`{{` and `}}` for literal braces).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                Part::Literal(l) => f.write_str(&l.replace('{', "{{").replace('}', "}}"))?,
                Part::Var(v) => write!(f, "{v}")?,
            }
        }
        Ok(())
    }
}

/// One variable's value for this request.
pub fn render_var(var: &Var, ctx: &RenderContext) -> Result<String, String> {
    let find = |pairs: &[(String, String)], name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match var {
        Var::Path(name) => {
            find(ctx.path, name).ok_or_else(|| format!("the path has no parameter {name}"))
        }
        Var::Query(name) => {
            find(ctx.query, name).ok_or_else(|| format!("the query parameter {name} is required"))
        }
        Var::Header(name) => {
            (ctx.header)(name).ok_or_else(|| format!("the header {name} is required"))
        }
        Var::Uuid => Ok((ctx.uuid)()),
        Var::RequestId => Ok(ctx.request_id.to_owned()),
        Var::Date(fmt_) => Ok(crate::time::Utc::from_millis(ctx.now_ms).format(fmt_)),
        Var::Jwt(name) => match ctx.jwt.and_then(|claims| claims.get(name)) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                Ok(v.to_string())
            }
            _ => Err(format!("the caller's token has no text claim {name}")),
        },
        Var::Body => match ctx.body.map(std::str::from_utf8) {
            Some(Ok(text)) => Ok(text.to_owned()),
            Some(Err(_)) => Err("the body is not UTF-8 text".to_owned()),
            None => Err("the request has no body".to_owned()),
        },
        Var::BodyBase64 => ctx
            .body
            .map(crate::encoding::base64)
            .ok_or_else(|| "the request has no body".to_owned()),
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
        Some(("jwt", name)) => named("jwt", name, Var::Jwt),
        None if inner == "uuid" => Ok(Var::Uuid),
        None if inner == "request_id" => Ok(Var::RequestId),
        None if inner == "body" => Ok(Var::Body),
        None if inner == "body_base64" => Ok(Var::BodyBase64),
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

/// How a body template's values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyFormat {
    Json,
    Xml,
}

impl BodyFormat {
    /// The format of a media type, when a template can build it.
    pub fn of(content_type: &str) -> Option<BodyFormat> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        if essence == "application/json" || essence.ends_with("+json") {
            Some(BodyFormat::Json)
        } else if essence == "application/xml" || essence == "text/xml" || essence.ends_with("+xml")
        {
            Some(BodyFormat::Xml)
        } else {
            None
        }
    }

    /// Writes `value` escaped for a string in this format (a JSON string's inside, XML text or
    /// an attribute value); XML refuses a character it cannot carry even escaped.
    pub fn escape(self, value: &str, out: &mut String) -> Result<(), (usize, char)> {
        match self {
            BodyFormat::Json => {
                crate::encoding::push_json_str_inner(out, value);
                Ok(())
            }
            BodyFormat::Xml => crate::encoding::xml_escape(value, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_one_the_template_could_render_only_with_its_literals_in_order() {
        let t = Template::parse("in/{path.tenant}/{date:%Y/%m}/{uuid}.json").unwrap();
        assert!(t.could_render("in/contoso/2026/12/0b1c.json"));
        assert!(t.could_render("in/a/b/c/d/e.json.json"));
        assert!(!t.could_render("out/contoso/2026/12/0b1c.json"));
        assert!(!t.could_render("in/contoso/2026/12/0b1c.xml"));
        assert!(
            !t.could_render("in/contoso.json"),
            "the literal / between variables"
        );
        let fixed = Template::parse("reports/latest.csv").unwrap();
        assert!(fixed.could_render("reports/latest.csv"));
        assert!(!fixed.could_render("reports/latest.csv2"));
        assert!(!fixed.could_render("reports/latest.cs"));
        let any = Template::parse("{path.name}").unwrap();
        assert!(any.could_render("anything/at/all"));
        assert_eq!(t.to_string(), "in/{path.tenant}/{date:%Y/%m}/{uuid}.json");
        let braces = Template::parse("a{{b}}{uuid}").unwrap();
        assert_eq!(braces.to_string(), "a{{b}}{uuid}");
        assert!(braces.could_render("a{b}x"));
    }

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
    fn renders_from_the_request() {
        let t =
            Template::parse("{path.t}/{date:%Y/%m}/{query.v}-{header.x-id}-{uuid}-{request_id}")
                .unwrap();
        let header = |name: &str| (name == "x-id").then(|| "h1".to_owned());
        let claims = serde_json::json!({"sub": "user-1", "n": 5})
            .as_object()
            .cloned()
            .unwrap();
        let ctx = RenderContext {
            path: &[("t".into(), "contoso".into())],
            query: &[("v".into(), "2".into())],
            header: &header,
            request_id: "r1",
            uuid: &|| "u1".to_owned(),
            now_ms: 1_709_210_096_000.0,
            jwt: Some(&claims),
            body: None,
        };
        assert_eq!(t.render(&ctx).unwrap(), "contoso/2024/02/2-h1-u1-r1");
        let missing = Template::parse("{query.nope}")
            .unwrap()
            .render(&ctx)
            .unwrap_err();
        assert_eq!(missing, "the query parameter nope is required");
        assert_eq!(
            Template::parse("{jwt.sub}/{jwt.n}")
                .unwrap()
                .render(&ctx)
                .unwrap(),
            "user-1/5"
        );
        assert!(Template::parse("{jwt.roles}")
            .unwrap()
            .render(&ctx)
            .unwrap_err()
            .contains("no text claim roles"));
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

    #[test]
    fn template_values_are_escaped_for_their_format() {
        let mut out = String::new();
        BodyFormat::Json.escape("a\"b\\\n", &mut out).unwrap();
        assert_eq!(out, "a\\\"b\\\\\\n");
        out.clear();
        BodyFormat::Xml.escape("<a & 'b'>", &mut out).unwrap();
        assert_eq!(out, "&lt;a &amp; &apos;b&apos;&gt;");
        assert_eq!(
            BodyFormat::Xml.escape("ok\u{1b}", &mut out),
            Err((2, '\u{1b}'))
        );
        assert_eq!(
            BodyFormat::of("application/json; charset=utf-8"),
            Some(BodyFormat::Json)
        );
        assert_eq!(
            BodyFormat::of("application/atom+xml"),
            Some(BodyFormat::Xml)
        );
        assert_eq!(BodyFormat::of("text/plain"), None);
    }
}
