//! Header injection: `{param}` / `{env:NAME}` templates and per-request rendering.

use std::fmt;
use std::time::SystemTime;

use hyper::header::{HeaderName, HeaderValue};

use super::hosts::HostPattern;
use super::jwt::JwtMinter;
use super::Params;

/// Why an injection could not be rendered for a request. The request must then not be
/// sent with the credential half filled: the relay answers it with an error and logs this.
/// No variant carries a credential.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("outbound parameter `{0}` is missing")]
    MissingParameter(String),
    #[error("environment variable `{0}` is not set")]
    MissingEnv(String),
    #[error("environment variable `{0}` is not valid UTF-8")]
    EnvNotUnicode(String),
    #[error("the value rendered for header `{0}` is not a valid HTTP header value")]
    InvalidHeaderValue(String),
    #[error("the system clock is before 1970")]
    Clock,
    #[error("cannot sign the JWT: {0}")]
    Jwt(jsonwebtoken::errors::Error),
}

#[derive(Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Env(String),
}

/// A parsed `value` or claim template: `{NAME}` is an outbound parameter, `{env:NAME}` an
/// environment variable of the daemon read at render time, `{{` and `}}` literal braces.
/// Its `Debug` output names the placeholders but never shows the literal text, which may
/// be a credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
}

/// Whether `name` is usable as an outbound parameter name (`[A-Za-z0-9_.-]+`).
pub fn is_param_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn is_env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Template {
    /// Parses a template; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut lit = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|x| x.1) == Some('{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek().map(|x| x.1) == Some('}') => {
                    chars.next();
                    lit.push('}');
                }
                '}' => return Err("unmatched `}` (write `}}` for a literal brace)".into()),
                '{' => {
                    let rest = &text[i + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err("unclosed `{` (write `{{` for a literal brace)".into());
                    };
                    let name = &rest[..end];
                    let seg = if let Some(env) = name.strip_prefix("env:") {
                        if !is_env_name(env) {
                            return Err(format!("`{{{name}}}`: invalid environment variable name"));
                        }
                        Segment::Env(env.to_string())
                    } else {
                        if !is_param_name(name) {
                            return Err(format!(
                                "`{{{name}}}`: invalid parameter name (letters, digits, `_`, `-`, `.`; `{{env:NAME}}` for an environment variable)"
                            ));
                        }
                        Segment::Param(name.to_string())
                    };
                    // skip the placeholder's characters
                    while chars.next_if(|&(j, _)| j <= i + 1 + end).is_some() {}
                    if !lit.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut lit)));
                    }
                    segments.push(seg);
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            segments.push(Segment::Literal(lit));
        }
        Ok(Template { segments })
    }

    /// Fills the template in; the first missing parameter or variable is an error.
    pub fn render(&self, params: &Params) -> Result<String, InjectError> {
        let mut out = String::new();
        for seg in &self.segments {
            match seg {
                Segment::Literal(s) => out.push_str(s),
                Segment::Param(p) => match params.get(p) {
                    Some(v) => out.push_str(v),
                    None => return Err(InjectError::MissingParameter(p.clone())),
                },
                Segment::Env(e) => match std::env::var(e) {
                    Ok(v) => out.push_str(&v),
                    Err(std::env::VarError::NotPresent) => {
                        return Err(InjectError::MissingEnv(e.clone()))
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(InjectError::EnvNotUnicode(e.clone()))
                    }
                },
            }
        }
        Ok(out)
    }

    /// The outbound parameters the template uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Param(p) => Some(p.as_str()),
            _ => None,
        })
    }

    /// The environment variables the template uses.
    pub fn env_vars(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Env(e) => Some(e.as_str()),
            _ => None,
        })
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut l = f.debug_list();
        for seg in &self.segments {
            match seg {
                Segment::Literal(_) => l.entry(&format_args!("<redacted>")),
                Segment::Param(p) => l.entry(&format_args!("{{{p}}}")),
                Segment::Env(e) => l.entry(&format_args!("{{env:{e}}}")),
            };
        }
        l.finish()
    }
}

#[derive(Clone)]
pub(crate) enum InjectKind {
    Value(Template),
    Jwt(Box<JwtMinter>),
}

/// One `[[outbound.NAME.inject]]` entry, ready to render.
#[derive(Clone)]
pub struct Injection {
    pub(crate) host: HostPattern,
    pub(crate) header: HeaderName,
    pub(crate) kind: InjectKind,
}

impl Injection {
    /// The hosts this injection applies to.
    pub fn host(&self) -> &HostPattern {
        &self.host
    }

    /// The header it sets.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Whether the value is a JWT minted per request.
    pub fn is_jwt(&self) -> bool {
        matches!(self.kind, InjectKind::Jwt(_))
    }

    /// The daemon's environment variables its value or claims read.
    pub fn env_vars(&self) -> Vec<&str> {
        let mut templates = Vec::new();
        match &self.kind {
            InjectKind::Value(t) => templates.push(t),
            InjectKind::Jwt(m) => m.claims.templates(&mut templates),
        }
        templates.into_iter().flat_map(Template::env_vars).collect()
    }

    /// The header to add to a request, for that request's parameters. The value is marked
    /// sensitive. Any missing parameter or variable is an error: never a half-filled value.
    pub fn render(
        &self,
        params: &Params,
        now: SystemTime,
    ) -> Result<(HeaderName, HeaderValue), InjectError> {
        let text = match &self.kind {
            InjectKind::Value(t) => t.render(params)?,
            InjectKind::Jwt(m) => format!("Bearer {}", m.mint(params, now)?),
        };
        let mut value = HeaderValue::from_bytes(text.as_bytes())
            .map_err(|_| InjectError::InvalidHeaderValue(self.header.to_string()))?;
        value.set_sensitive(true);
        Ok((self.header.clone(), value))
    }
}

impl fmt::Debug for Injection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Injection");
        d.field("host", &self.host).field("header", &self.header);
        match &self.kind {
            InjectKind::Value(t) => d.field("value", t),
            InjectKind::Jwt(m) => d.field("jwt", m),
        };
        d.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> Params {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn params_and_escapes() {
        let t = Template::parse("Bearer {customer_name}/{{literal}}/{url}}}").unwrap();
        let out = t
            .render(&params(&[("customer_name", "acme"), ("url", "https://x/")]))
            .unwrap();
        assert_eq!(out, "Bearer acme/{literal}/https://x/}");
        assert_eq!(t.params().collect::<Vec<_>>(), ["customer_name", "url"]);
        assert_eq!(
            Template::parse("").unwrap().render(&Params::new()).unwrap(),
            ""
        );
        assert_eq!(
            Template::parse("{a}{b}")
                .unwrap()
                .render(&params(&[("a", "1"), ("b", "2")]))
                .unwrap(),
            "12"
        );
        assert_eq!(
            Template::parse("ü{a}ß")
                .unwrap()
                .render(&params(&[("a", "-")]))
                .unwrap(),
            "ü-ß"
        );
    }

    #[test]
    fn missing_parameter_is_an_error() {
        let t = Template::parse("x-{present}-{absent}").unwrap();
        match t.render(&params(&[("present", "1")])) {
            Err(InjectError::MissingParameter(p)) => assert_eq!(p, "absent"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn env_vars() {
        std::env::set_var("INTERCEPTOR_TEST_TEMPLATE_TOKEN", "s3cret");
        let t = Template::parse("Bearer {env:INTERCEPTOR_TEST_TEMPLATE_TOKEN}").unwrap();
        assert_eq!(t.render(&Params::new()).unwrap(), "Bearer s3cret");
        let t = Template::parse("{env:INTERCEPTOR_TEST_SURELY_UNSET_VAR}").unwrap();
        match t.render(&Params::new()) {
            Err(InjectError::MissingEnv(e)) => assert_eq!(e, "INTERCEPTOR_TEST_SURELY_UNSET_VAR"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_templates() {
        for bad in [
            "{", "}", "a{b", "a}b", "{}", "{a b}", "{env:}", "{env:1X}", "{x{y}}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn debug_redacts_literals() {
        let t = Template::parse("Bearer sk-live-123 {customer_name} {env:TOKEN}").unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("sk-live"), "{dbg}");
        assert!(
            dbg.contains("{customer_name}") && dbg.contains("{env:TOKEN}"),
            "{dbg}"
        );
    }

    #[test]
    fn header_injection_via_param_is_refused() {
        let inj = Injection {
            host: HostPattern::parse("api.example.com").unwrap(),
            header: HeaderName::from_static("x-customer"),
            kind: InjectKind::Value(Template::parse("{customer_name}").unwrap()),
        };
        let err = inj
            .render(
                &params(&[("customer_name", "a\r\nX-Evil: 1")]),
                SystemTime::now(),
            )
            .unwrap_err();
        assert!(matches!(err, InjectError::InvalidHeaderValue(_)));
        let (name, value) = inj
            .render(&params(&[("customer_name", "acme")]), SystemTime::now())
            .unwrap();
        assert_eq!(name, "x-customer");
        assert_eq!(value, "acme");
        assert!(value.is_sensitive());
    }
}
