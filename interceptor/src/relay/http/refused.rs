//! Every way the relay refuses an HTTP request, or fails to carry it, as one type:
//! each step of the pipeline returns it, and one place turns it into the
//! response and the log line (its status, rule, decision and body are here).

use std::borrow::Cow;

use hyper::{Response, StatusCode};

use super::budget::HEAD_LIMIT;
use super::respond::{json, RelayBody};
use crate::logs::{LogEntry, Verdict};
use crate::policy::Decision;

const CONNECT_NOT_SUPPORTED: &str =
    "CONNECT is not supported: connections are intercepted as they are, no proxy setting is needed";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(super) enum Refused {
    /// The request target names no host (and port) the relay can judge.
    #[error("{0}")]
    BadTarget(&'static str),
    /// Connections are intercepted without a proxy setting; a tunnel would carry
    /// requests the relay could no longer judge one by one.
    #[error("{CONNECT_NOT_SUPPORTED}")]
    Connect,
    /// By the tenant's hosts, a request context, a limit, or every address the
    /// host resolved to (guarded ranges, the relay itself): `rule` says which.
    #[error("blocked: {rule}")]
    Blocked { rule: String },
    /// A credential could not be rendered: never send a half-filled one.
    #[error("{error}")]
    Inject { header: String, error: String },
    #[error("cannot resolve: {0}")]
    Unresolvable(String),
    /// The path could not be sent on as an origin-form target.
    #[error("bad path")]
    BadPath,
    /// Connecting, sending, or what the upstream answered (a switch unasked for).
    #[error("{0}")]
    Upstream(String),
    /// A head over the budget: hyper answers it (431) before any request exists.
    #[error("request head over {HEAD_LIMIT} bytes")]
    HeadTooLarge,
    /// A head hyper could not parse: hyper answers it (400).
    #[error("{0}")]
    Unreadable(String),
    /// The first head cut short or never finished: there is no one to answer.
    #[error("{0}")]
    Unfinished(String),
}

impl From<Decision> for Refused {
    fn from(decision: Decision) -> Self {
        Refused::Blocked {
            rule: decision.rule,
        }
    }
}

impl Refused {
    /// What the client is answered with; `None` when the connection ended first.
    pub fn status(&self) -> Option<StatusCode> {
        Some(match self {
            Refused::BadTarget(_) | Refused::BadPath | Refused::Unreadable(_) => {
                StatusCode::BAD_REQUEST
            }
            Refused::Connect => StatusCode::METHOD_NOT_ALLOWED,
            Refused::Blocked { .. } => StatusCode::FORBIDDEN,
            Refused::Inject { .. } | Refused::Unresolvable(_) | Refused::Upstream(_) => {
                StatusCode::BAD_GATEWAY
            }
            Refused::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refused::Unfinished(_) => return None,
        })
    }

    /// The log's `rule`.
    pub fn rule(&self) -> Cow<'_, str> {
        Cow::Borrowed(match self {
            Refused::BadTarget(_)
            | Refused::BadPath
            | Refused::Unreadable(_)
            | Refused::Unfinished(_) => "bad-request",
            Refused::Connect => "connect",
            Refused::Blocked { rule } => rule,
            Refused::Inject { header, .. } => return Cow::Owned(format!("inject:{header}")),
            Refused::Unresolvable(_) => "resolve",
            Refused::Upstream(_) => "upstream",
            Refused::HeadTooLarge => "limit:head",
        })
    }

    /// The log's `decision`: `block` when the policy or a limit said no, `error`
    /// when the request could not be read or carried.
    pub fn decision(&self) -> Verdict {
        match self {
            Refused::Connect | Refused::Blocked { .. } | Refused::HeadTooLarge => Verdict::Block,
            Refused::BadTarget(_)
            | Refused::Inject { .. }
            | Refused::Unresolvable(_)
            | Refused::BadPath
            | Refused::Upstream(_)
            | Refused::Unreadable(_)
            | Refused::Unfinished(_) => Verdict::Error,
        }
    }

    /// The log's `error`: what went wrong, not what the policy decided.
    fn error(&self) -> Option<String> {
        match self {
            Refused::Connect | Refused::Blocked { .. } => None,
            _ => Some(self.to_string()),
        }
    }

    /// The JSON body the client is answered with, about `host`.
    pub fn body(&self, host: &str) -> serde_json::Value {
        match self {
            Refused::Blocked { rule } => {
                serde_json::json!({ "error": "blocked", "host": host, "rule": rule })
            }
            Refused::Connect => serde_json::json!({
                "error": CONNECT_NOT_SUPPORTED,
                "host": host,
                "rule": "connect",
            }),
            Refused::Inject { .. } | Refused::Unresolvable(_) | Refused::Upstream(_) => {
                serde_json::json!({ "error": self.to_string(), "host": host })
            }
            // Refused before a host was known (or hyper's own answer).
            Refused::BadTarget(_)
            | Refused::BadPath
            | Refused::HeadTooLarge
            | Refused::Unreadable(_)
            | Refused::Unfinished(_) => serde_json::json!({ "error": self.to_string() }),
        }
    }

    /// The response to a refused request about `host`.
    pub fn response(&self, host: &str) -> Response<RelayBody> {
        // Only a connection that ended has no status, and it is never answered.
        let status = self.status().unwrap_or(StatusCode::BAD_REQUEST);
        json(status, self.body(host))
    }

    /// Fills in the log line's verdict, rule, status and error.
    pub fn log_into(&self, entry: &mut LogEntry) {
        entry.decision = self.decision();
        entry.rule = self.rule().into_owned();
        entry.status = self.status().map(|s| s.as_u16());
        entry.error = self.error();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Proto;
    use http_body_util::BodyExt;

    /// Status, rule, decision, log error and body, as the client and the log see them.
    fn seen(refused: Refused) -> (Option<u16>, String, Verdict, Option<String>, String) {
        let mut entry = LogEntry::with_dst("t", Proto::Http, "127.0.0.2:80".into());
        refused.log_into(&mut entry);
        let body = refused.body("api.test").to_string();
        (entry.status, entry.rule, entry.decision, entry.error, body)
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn a_blocked_request_is_a_403_naming_its_host_and_rule_without_an_error() {
        assert_eq!(
            seen(Refused::from(Decision::block("block:evil.test"))),
            (
                Some(403),
                "block:evil.test".into(),
                Verdict::Block,
                None,
                r#"{"error":"blocked","host":"api.test","rule":"block:evil.test"}"#.into()
            )
        );
        // Limits and request contexts are refused the same way, by their rule.
        let (status, rule, ..) = seen(Refused::Blocked {
            rule: "limit:subrequests".into(),
        });
        assert_eq!((status, rule.as_str()), (Some(403), "limit:subrequests"));
    }

    #[test]
    fn connect_is_a_405_blocked_by_rule_connect() {
        let (status, rule, decision, error, body) = seen(Refused::Connect);
        assert_eq!(
            (status, rule.as_str(), decision, error),
            (Some(405), "connect", Verdict::Block, None)
        );
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["host"], "api.test");
        assert_eq!(body["rule"], "connect");
        assert!(body["error"]
            .as_str()
            .unwrap()
            .starts_with("CONNECT is not supported"));
    }

    #[test]
    fn what_could_not_be_carried_is_a_502_error_naming_its_host() {
        let inject = Refused::Inject {
            header: "authorization".into(),
            error: "missing parameter user".into(),
        };
        assert_eq!(
            seen(inject),
            (
                Some(502),
                "inject:authorization".into(),
                Verdict::Error,
                some("missing parameter user"),
                r#"{"error":"missing parameter user","host":"api.test"}"#.into()
            )
        );
        assert_eq!(
            seen(Refused::Unresolvable("nxdomain".into())),
            (
                Some(502),
                "resolve".into(),
                Verdict::Error,
                some("cannot resolve: nxdomain"),
                r#"{"error":"cannot resolve: nxdomain","host":"api.test"}"#.into()
            )
        );
        assert_eq!(
            seen(Refused::Upstream("connection refused".into())),
            (
                Some(502),
                "upstream".into(),
                Verdict::Error,
                some("connection refused"),
                r#"{"error":"connection refused","host":"api.test"}"#.into()
            )
        );
    }

    #[test]
    fn a_request_without_a_usable_target_is_a_400_error_naming_no_host() {
        assert_eq!(
            seen(Refused::BadTarget("invalid port")),
            (
                Some(400),
                "bad-request".into(),
                Verdict::Error,
                some("invalid port"),
                r#"{"error":"invalid port"}"#.into()
            )
        );
        assert_eq!(
            seen(Refused::BadPath),
            (
                Some(400),
                "bad-request".into(),
                Verdict::Error,
                some("bad path"),
                r#"{"error":"bad path"}"#.into()
            )
        );
    }

    #[test]
    fn heads_hyper_refused_are_logged_with_the_status_it_answered() {
        let (status, rule, decision, error, _) = seen(Refused::HeadTooLarge);
        assert_eq!(
            (status, rule.as_str(), decision, error),
            (
                Some(431),
                "limit:head",
                Verdict::Block,
                Some(format!("request head over {HEAD_LIMIT} bytes"))
            )
        );
        let (status, rule, decision, ..) = seen(Refused::Unreadable("invalid token".into()));
        assert_eq!(
            (status, rule.as_str(), decision),
            (Some(400), "bad-request", Verdict::Error)
        );
        // Cut short: nobody was answered, so no status is logged.
        let (status, rule, decision, error, _) = seen(Refused::Unfinished("eof".into()));
        assert_eq!(
            (status, rule.as_str(), decision, error),
            (None, "bad-request", Verdict::Error, some("eof"))
        );
    }

    #[tokio::test]
    async fn the_response_carries_the_status_and_the_json_body() {
        let response = Refused::from(Decision::block("guarded:loopback")).response("api.test");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &body[..],
            br#"{"error":"blocked","host":"api.test","rule":"guarded:loopback"}"#
        );
    }
}
