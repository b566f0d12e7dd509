//! One HTTP request through the relay, as named steps: read its target, refuse
//! tunnels, verify a Worker's request context, judge the host, then carry it
//! (inject, choose the upstream, rewrite, send). Each step may refuse with a
//! [`Refused`]; [`handle_request`] alone turns that into the response and the
//! log line.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderName, HeaderValue, HOST};
use hyper::http::uri::PathAndQuery;
use hyper::upgrade::OnUpgrade;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};

use super::body::Metered;
use super::refused::Refused;
use super::respond::{self, RelayBody};
use super::target::{Dialled, RequestTarget, Upstream};
use super::{record, upstream, Connection, RelayContext};
use crate::context::{RequestContext, CONTEXT_HEADER};
use crate::headers::{is_websocket_upgrade, restore_websocket_upgrade, strip_hop_by_hop};
use crate::logs::{LogEntry, Proto};
use crate::policy::Params;
use crate::policy::{Action, Decision, OutboundPolicy};
use crate::relay::sandbox_entry;

/// A request as the pipeline has learnt it so far.
pub(super) struct Subrequest {
    /// Its log line, filled in as each step learns something: a refusal is
    /// logged with exactly what was known when it happened.
    pub entry: LogEntry,
    /// Bytes of the request body sent on.
    pub sent: Arc<AtomicU64>,
}

/// What the upstream answered, and the client's side of a WebSocket it may
/// agree to.
pub(super) struct Forwarded {
    pub response: Response<Incoming>,
    pub client_upgrade: Option<OnUpgrade>,
}

pub(super) async fn handle_request(
    req: Request<Incoming>,
    conn: &Arc<Connection>,
    ctx: &RelayContext,
) -> Response<RelayBody> {
    let started = Instant::now();
    let mut sub = Subrequest {
        entry: sandbox_entry(&conn.sandbox, Proto::Http, conn.dst_text.clone(), conn.pid),
        sent: Arc::default(),
    };
    sub.entry.method = Some(req.method().to_string());
    match forward(&mut sub, req, conn, ctx).await {
        Ok(forwarded) => respond::relayed(ctx, conn, sub, forwarded, started).await,
        Err(refused) => {
            let response = refused.response(sub.entry.host.as_deref().unwrap_or_default());
            refused.log_into(&mut sub.entry);
            sub.entry.bytes_sent = sub.sent.load(Ordering::Relaxed);
            record(ctx, conn, sub.entry, started);
            response
        }
    }
}

/// Every step up to the upstream's response.
async fn forward(
    sub: &mut Subrequest,
    req: Request<Incoming>,
    conn: &Connection,
    ctx: &RelayContext,
) -> Result<Forwarded, Refused> {
    let dialled = Dialled {
        addr: conn.dst,
        is_relay: conn.dialled_relay,
    };
    let target = RequestTarget::of(&req, dialled)?;
    sub.entry.host = Some(target.host.clone());
    refuse_tunnel(req.method())?;
    // Not before: a CONNECT's target is an authority, not a URL.
    sub.entry.url = Some(target.url.clone());
    let context = request_context(&req, conn, ctx)?;
    if let Some(context) = &context {
        // A dispatched Worker's request brings its own parameters.
        sub.entry.params = context.params.clone();
        count_subrequest(ctx, context)?;
    }
    let params = context.as_ref().map_or(&conn.sandbox.params, |c| &c.params);
    let policy = &conn.sandbox.tenant.policy;
    sub.entry.rule = judge(policy, &target)?.rule;
    // The outbound Worker's step goes here: it sees only what the declarative
    // judgement let through, and answers in place of `carry`.
    carry(sub, req, &target, params, policy, ctx).await
}

/// The built-in outbound step: the policy's injections, then on to the upstream.
async fn carry(
    sub: &mut Subrequest,
    req: Request<Incoming>,
    target: &RequestTarget,
    params: &Params,
    policy: &OutboundPolicy,
    ctx: &RelayContext,
) -> Result<Forwarded, Refused> {
    let injected = inject(policy, &target.host, params)?;
    let upstream = choose_upstream(ctx, policy, target).await?;
    sub.entry.upstream = Some(upstream.0.to_string());
    let (request, client_upgrade) = upstream_request(req, target, injected, &sub.sent)?;
    let response = send(ctx, upstream, target, request, client_upgrade.is_some()).await?;
    Ok(Forwarded {
        response,
        client_upgrade,
    })
}

/// Connections are intercepted without a proxy setting; a tunnel would carry
/// requests the relay could no longer judge one by one.
fn refuse_tunnel(method: &Method) -> Result<(), Refused> {
    if *method == Method::CONNECT {
        return Err(Refused::Connect);
    }
    Ok(())
}

/// The verified request context of a dispatched Worker's subrequest. Only a
/// Worker's sandbox may present one, and only its own: anything else is refused.
fn request_context(
    req: &Request<Incoming>,
    conn: &Connection,
    ctx: &RelayContext,
) -> Result<Option<RequestContext>, Refused> {
    let refuse = |rule: &str| Refused::Blocked { rule: rule.into() };
    let Some(token) = req.headers().get(CONTEXT_HEADER) else {
        return Ok(None);
    };
    let Some(worker) = &conn.sandbox.worker else {
        return Err(refuse("context:not-a-worker"));
    };
    let context = token
        .to_str()
        .ok()
        .and_then(|token| ctx.context_key.verify(token).ok())
        .ok_or_else(|| refuse("context:invalid"))?;
    if context.namespace != worker.namespace || context.worker != worker.name {
        return Err(refuse("context:foreign"));
    }
    Ok(Some(context))
}

/// `limits.subrequests` of the dispatched request this one belongs to.
fn count_subrequest(ctx: &RelayContext, context: &RequestContext) -> Result<(), Refused> {
    match context.subrequest_limit {
        Some(limit) if ctx.subrequests.count(context.request_id) > limit => Err(Refused::Blocked {
            rule: "limit:subrequests".into(),
        }),
        _ => Ok(()),
    }
}

/// The declarative judgement: the tenant's host lists.
fn judge(policy: &OutboundPolicy, target: &RequestTarget) -> Result<Decision, Refused> {
    let decision = target.decide(policy);
    match decision.action {
        Action::Block => Err(decision.into()),
        Action::Allow => Ok(decision),
    }
}

/// The policy's headers for `host`, rendered whole or not at all.
fn inject(
    policy: &OutboundPolicy,
    host: &str,
    params: &Params,
) -> Result<Vec<(HeaderName, HeaderValue)>, Refused> {
    policy
        .injections_for(host)
        .map(|injection| {
            injection
                .render(params, SystemTime::now())
                .map_err(|e| Refused::Inject {
                    header: injection.header().to_string(),
                    error: e.to_string(),
                })
        })
        .collect()
}

async fn choose_upstream(
    ctx: &RelayContext,
    policy: &OutboundPolicy,
    target: &RequestTarget,
) -> Result<Upstream, Refused> {
    let chosen =
        upstream::choose(&ctx.resolver, policy, &ctx.local, &target.host, target.port).await;
    match chosen {
        Ok(addr) => Ok(Upstream(addr)),
        Err(upstream::Refusal::Blocked(refused)) => Err(refused.into()),
        Err(upstream::Refusal::Unresolvable(why)) => Err(Refused::Unresolvable(why)),
    }
}

/// The request as the upstream gets it: origin-form, HTTP/1.1, no hop-by-hop
/// headers or request context, the judged authority as its Host, the injected
/// headers; and the client's side of a WebSocket, taken before it is passed on.
fn upstream_request<B: Body>(
    mut req: Request<B>,
    target: &RequestTarget,
    injected: Vec<(HeaderName, HeaderValue)>,
    sent: &Arc<AtomicU64>,
) -> Result<(Request<Metered<B>>, Option<OnUpgrade>), Refused> {
    let client_upgrade =
        is_websocket_upgrade(req.version(), req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if client_upgrade.is_some() {
        restore_websocket_upgrade(&mut parts.headers);
    }
    parts.headers.remove(CONTEXT_HEADER);
    parts.headers.insert(
        HOST,
        HeaderValue::from_str(target.authority.as_str()).expect("authority is a valid header"),
    );
    for (name, value) in injected {
        parts.headers.insert(name, value);
    }
    let path = parts
        .uri
        .path_and_query()
        .map(PathAndQuery::as_str)
        .unwrap_or("/");
    parts.uri = Uri::from_str(path).map_err(|_| Refused::BadPath)?;
    parts.version = Version::HTTP_11;
    let request = Request::from_parts(parts, Metered::new(body, sent.clone(), None));
    Ok((request, client_upgrade))
}

async fn send(
    ctx: &RelayContext,
    upstream: Upstream,
    target: &RequestTarget,
    request: Request<Metered<Incoming>>,
    upgrade: bool,
) -> Result<Response<Incoming>, Refused> {
    let server_name = target.tls.then_some(target.host.as_str());
    let response = ctx
        .upstream
        .send(upstream.0, server_name, request, upgrade)
        .await
        .map_err(Refused::Upstream)?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS && !upgrade {
        // Nothing was asked for: no protocol the relay could follow.
        return Err(Refused::Upstream(
            "upstream switched protocols unasked".into(),
        ));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn policy(toml: &str) -> OutboundPolicy {
        let cfg = crate::config::parse(toml, Path::new("/test/interceptor.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        OutboundPolicy::from_config(&cfg.outbound["e"]).unwrap()
    }

    fn target(uri: &str, host: &str) -> RequestTarget {
        let req = Request::get(uri).header(HOST, host).body(()).unwrap();
        let dialled = Dialled {
            addr: "127.0.0.2:80".parse().unwrap(),
            is_relay: false,
        };
        RequestTarget::of(&req, dialled).unwrap()
    }

    #[test]
    fn connect_is_refused_whatever_its_host() {
        assert_eq!(refuse_tunnel(&Method::CONNECT), Err(Refused::Connect));
        assert_eq!(refuse_tunnel(&Method::GET), Ok(()));
    }

    #[test]
    fn a_blocked_host_is_refused_by_the_rule_that_blocked_it() {
        let policy = policy("[outbound.e]\nblock = [\"evil.test\"]\n");
        let refused = judge(&policy, &target("/", "EVIL.test.")).unwrap_err();
        assert_eq!(
            refused,
            Refused::Blocked {
                rule: "block:evil.test".into()
            }
        );
        assert_eq!(refused.status(), Some(StatusCode::FORBIDDEN));
        // Control: another host is let through, by the rule that allowed it.
        let allowed = judge(&policy, &target("/", "api.test")).unwrap();
        assert_eq!(allowed.rule, "default:allow");
    }

    #[test]
    fn a_credential_that_cannot_be_rendered_refuses_the_request_by_its_header() {
        let policy = policy(
            "[outbound.e]\n[[outbound.e.inject]]\nhost = \"api.test\"\nheader = \"X-Customer\"\nvalue = \"{customer}\"\n",
        );
        let refused = inject(&policy, "api.test", &Params::new()).unwrap_err();
        assert_eq!(refused.rule(), "inject:x-customer");
        assert_eq!(refused.status(), Some(StatusCode::BAD_GATEWAY));
        // Control: with the parameter, the header is rendered; elsewhere, nothing.
        let params = Params::from([("customer".to_string(), "acme".to_string())]);
        let injected = inject(&policy, "api.test", &params).unwrap();
        assert_eq!(
            injected,
            [(
                HeaderName::from_static("x-customer"),
                HeaderValue::from_static("acme")
            )]
        );
        assert!(inject(&policy, "other.test", &Params::new())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_upstream_gets_the_judged_authority_and_the_injections_never_the_context() {
        let req = Request::get("http://api.test:8080/a?b=1")
            .header(HOST, "evil.test")
            .header(CONTEXT_HEADER, "token")
            .header("connection", "keep-alive")
            .header("authorization", "Bearer the-sandbox's")
            .body(String::from("body"))
            .unwrap();
        let judged = target("http://api.test:8080/a?b=1", "evil.test");
        let injected = vec![(
            HeaderName::from_static("authorization"),
            HeaderValue::from_static("Bearer injected"),
        )];
        let (sent_on, upgrade) = upstream_request(req, &judged, injected, &Arc::default()).unwrap();
        assert!(upgrade.is_none());
        assert_eq!(sent_on.uri(), "/a?b=1");
        assert_eq!(sent_on.version(), Version::HTTP_11);
        let headers = sent_on.headers();
        assert_eq!(headers[HOST], "api.test:8080");
        assert_eq!(headers["authorization"], "Bearer injected");
        assert!(!headers.contains_key(CONTEXT_HEADER));
        assert!(!headers.contains_key("connection"));
    }
}
