//! Walks the TOML document (with spans, via `toml_edit`) into a [`Config`], collecting
//! every problem as a positioned [`Diagnostic`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use hyper::header::HeaderName;
use ipnet::IpNet;
use toml_edit::{ImDocument, Item, TableLike, Value};

use super::*;
use crate::policy::{is_param_name, load_key, parse_algorithm, ALGORITHMS};

type Span = Option<Range<usize>>;

/// Headers the relay manages itself; injecting them would break or smuggle requests.
const FORBIDDEN_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "proxy-connection",
];

const TOP_KEYS: &[&str] = &[
    "interceptor",
    "resolve",
    "tenants",
    "dispatch_namespaces",
    "outbound",
];
const INTERCEPTOR_KEYS: &[&str] = &[
    "relay",
    "dns",
    "admin_socket",
    "log_dir",
    "state_dir",
    "cgroup",
    "sandbox_user",
    "upstream_ca",
    "log_max_bytes",
    "log_keep",
    "max_connections_per_tenant",
    "sandbox_uids",
    "sandbox_limits",
    "dns_forwarders",
    "dns_max_in_flight_per_tenant",
    "metrics",
];
const SANDBOX_LIMIT_KEYS: &[&str] = &["nofile", "nproc"];
const TENANT_KEYS: &[&str] = &["outbound", "params"];
const NAMESPACE_KEYS: &[&str] = &[
    "binding",
    "namespace",
    "listen",
    "workers",
    "outbound",
    "limits",
    "idle_timeout_seconds",
];
const NS_OUTBOUND_KEYS: &[&str] = &["service", "parameters"];
const LIMIT_KEYS: &[&str] = &["cpu_ms", "memory_mb", "subrequests"];
const OUTBOUND_KEYS: &[&str] = &["default", "allow", "block", "allow_cidrs", "log", "inject"];
const INJECT_KEYS: &[&str] = &["host", "header", "value", "jwt"];
const JWT_KEYS: &[&str] = &["algorithm", "key_file", "ttl_seconds", "claims", "kid"];

struct Ctx<'a> {
    text: &'a str,
    file: &'a Path,
    base_dir: PathBuf,
    diags: Vec<(usize, Diagnostic)>,
}

/// A key of a table and its item.
struct Field<'a> {
    key: &'a str,
    key_span: Span,
    item: &'a Item,
}

impl Field<'_> {
    /// The value's span, else the key's.
    fn span(&self) -> Span {
        self.item.span().or_else(|| self.key_span.clone())
    }
}

/// A table (standard or inline) with where it is and how to name it in messages.
struct Tbl<'a> {
    t: &'a dyn TableLike,
    span: Span,
    what: String,
}

impl<'a> Tbl<'a> {
    fn get(&self, key: &str) -> Option<Field<'a>> {
        let (k, item) = self.t.get_key_value(key)?;
        if item.is_none() {
            return None;
        }
        Some(Field {
            key: k.get(),
            key_span: k.span(),
            item,
        })
    }

    fn fields(&self) -> Vec<Field<'a>> {
        let t = self.t;
        t.iter()
            .filter(|(_, item)| !item.is_none())
            .map(|(k, item)| Field {
                key: k,
                key_span: t.key(k).and_then(|k| k.span()),
                item,
            })
            .collect()
    }
}

fn type_name(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
        Item::Value(v) => value_type_name(v),
    }
}

fn value_type_name(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}

impl<'a> Ctx<'a> {
    fn error(&mut self, span: Span, message: impl Into<String>) {
        let offset = span.map_or(0, |r| r.start).min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        self.diags.push((
            offset,
            Diagnostic {
                file: self.file.to_path_buf(),
                line: Some(line),
                column: Some(column),
                message: message.into(),
            },
        ));
    }

    fn check_keys(&mut self, tbl: &Tbl<'_>, allowed: &[&str]) {
        for f in tbl.fields() {
            if !allowed.contains(&f.key) {
                let msg = format!(
                    "unknown key `{}` in {}; expected one of: {}",
                    f.key,
                    tbl.what,
                    allowed.join(", ")
                );
                self.error(f.key_span.clone(), msg);
            }
        }
    }

    fn table<'t>(&mut self, f: &Field<'t>, what: String) -> Option<Tbl<'t>> {
        match f.item.as_table_like() {
            Some(t) => Some(Tbl {
                t,
                span: f.span(),
                what,
            }),
            None => {
                let msg = format!("`{}` must be a table, not {}", f.key, type_name(f.item));
                self.error(f.span(), msg);
                None
            }
        }
    }

    /// An array of tables, `[[x]]` or `x = [{...}, ...]`.
    fn tables<'t>(&mut self, f: &Field<'t>, what: &str) -> Vec<Tbl<'t>> {
        let mut out = Vec::new();
        match f.item {
            Item::ArrayOfTables(a) => {
                for (i, t) in a.iter().enumerate() {
                    out.push(Tbl {
                        t,
                        span: t.span().or_else(|| f.key_span.clone()),
                        what: format!("{what} #{}", i + 1),
                    });
                }
            }
            Item::Value(Value::Array(a)) => {
                for (i, v) in a.iter().enumerate() {
                    match v {
                        Value::InlineTable(t) => out.push(Tbl {
                            t,
                            span: t.span(),
                            what: format!("{what} #{}", i + 1),
                        }),
                        other => self.error(
                            other.span(),
                            format!(
                                "each entry of `{}` must be a table, not {}",
                                f.key,
                                value_type_name(other)
                            ),
                        ),
                    }
                }
            }
            Item::Table(_) | Item::Value(Value::InlineTable(_)) => {
                self.error(
                    f.span(),
                    format!(
                        "`{}` must be an array of tables (write `[[...]]`), not a single table",
                        f.key
                    ),
                );
            }
            other => {
                let msg = format!(
                    "`{}` must be an array of tables, not {}",
                    f.key,
                    type_name(other)
                );
                self.error(f.span(), msg);
            }
        }
        out
    }

    fn string(&mut self, f: &Field<'_>) -> Option<String> {
        match f.item.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                let msg = format!("`{}` must be a string, not {}", f.key, type_name(f.item));
                self.error(f.span(), msg);
                None
            }
        }
    }

    fn boolean(&mut self, f: &Field<'_>) -> Option<bool> {
        match f.item.as_bool() {
            Some(b) => Some(b),
            None => {
                let msg = format!(
                    "`{}` must be true or false, not {}",
                    f.key,
                    type_name(f.item)
                );
                self.error(f.span(), msg);
                None
            }
        }
    }

    /// An integer within `min..=max`.
    fn integer(&mut self, f: &Field<'_>, min: i64, max: i64) -> Option<i64> {
        match f.item.as_integer() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                let msg = if max == i64::MAX {
                    format!("`{}` must be at least {min}, not {n}", f.key)
                } else {
                    format!("`{}` must be between {min} and {max}, not {n}", f.key)
                };
                self.error(f.span(), msg);
                None
            }
            None => {
                let msg = format!("`{}` must be an integer, not {}", f.key, type_name(f.item));
                self.error(f.span(), msg);
                None
            }
        }
    }

    /// An array of strings (each with its span); wrong elements are reported and skipped.
    fn strings(&mut self, f: &Field<'_>) -> Option<Vec<(String, Span)>> {
        let Some(arr) = f.item.as_array() else {
            let msg = format!(
                "`{}` must be an array of strings, not {}",
                f.key,
                type_name(f.item)
            );
            self.error(f.span(), msg);
            return None;
        };
        let mut out = Vec::new();
        for v in arr.iter() {
            match v.as_str() {
                Some(s) => out.push((s.to_string(), v.span())),
                None => self.error(
                    v.span(),
                    format!(
                        "each entry of `{}` must be a string, not {}",
                        f.key,
                        value_type_name(v)
                    ),
                ),
            }
        }
        Some(out)
    }

    fn missing(&mut self, tbl: &Tbl<'_>, key: &str) {
        let msg = format!("{} is missing `{key}`", tbl.what);
        self.error(tbl.span.clone(), msg);
    }

    fn path(&mut self, f: &Field<'_>) -> Option<PathBuf> {
        let s = self.string(f)?;
        if s.is_empty() {
            self.error(f.span(), format!("`{}` must not be empty", f.key));
            return None;
        }
        Some(self.resolve_path(&s))
    }

    fn resolve_path(&self, s: &str) -> PathBuf {
        let p = PathBuf::from(s);
        if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        }
    }

    /// A socket address with a non-zero port; `ipv4_only` for relay and DNS.
    fn socket_addr(&mut self, f: &Field<'_>, ipv4_only: bool) -> Option<SocketAddr> {
        let s = self.string(f)?;
        let example = if ipv4_only {
            "127.0.0.1:15001"
        } else {
            "127.0.0.1:8080"
        };
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => {
                self.error(
                    f.span(),
                    format!("`{}`: port 0 is not a usable port", f.key),
                );
                None
            }
            Ok(SocketAddr::V6(_)) if ipv4_only => {
                self.error(
                    f.span(),
                    format!(
                        "`{}` must be an IPv4 address and port like \"{example}\" (the IPv6 one is [::1] on the same port)",
                        f.key
                    ),
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    f.span(),
                    format!(
                        "`{}`: \"{s}\" is not an address and port like \"{example}\"",
                        f.key
                    ),
                );
                None
            }
        }
    }

    /// A name used for files, cgroups and references.
    fn name(&mut self, name: &str, span: Span, kind: &str) -> bool {
        if is_valid_name(name) {
            return true;
        }
        self.error(
            span,
            format!(
                "invalid {kind} name `{name}`: use 1 to 64 of A-Z a-z 0-9 _ -, not starting with `-`"
            ),
        );
        false
    }

    fn outbound_ref(
        &mut self,
        name: &str,
        span: Span,
        outbounds: &BTreeSet<String>,
    ) -> Option<String> {
        if outbounds.contains(name) {
            return Some(name.to_string());
        }
        let known = if outbounds.is_empty() {
            "none is defined".to_string()
        } else {
            format!(
                "defined: {}",
                outbounds.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        };
        self.error(
            span,
            format!("unknown outbound `{name}` (no [outbound.{name}]; {known})"),
        );
        None
    }
}

pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let doc = match ImDocument::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let mut ctx = Ctx {
                text,
                file: path,
                base_dir: PathBuf::new(),
                diags: Vec::new(),
            };
            let message = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            ctx.error(e.span(), format!("TOML syntax error: {message}"));
            return Err(ConfigError {
                diagnostics: ctx.diags.into_iter().map(|(_, d)| d).collect(),
            });
        }
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base_dir = std::path::absolute(&parent).unwrap_or(parent);
    let mut ctx = Ctx {
        text,
        file: path,
        base_dir,
        diags: Vec::new(),
    };
    let root = Tbl {
        t: doc.as_table(),
        span: Some(0..0),
        what: "the top level".into(),
    };
    ctx.check_keys(&root, TOP_KEYS);

    let interceptor = match root.get("interceptor") {
        Some(f) => match ctx.table(&f, "[interceptor]".into()) {
            Some(t) => interceptor(&mut ctx, &t),
            None => InterceptorConfig::default(),
        },
        None => InterceptorConfig::default(),
    };
    let resolve = match root.get("resolve") {
        Some(f) => match ctx.table(&f, "[resolve]".into()) {
            Some(t) => resolve(&mut ctx, &t),
            None => BTreeMap::new(),
        },
        None => BTreeMap::new(),
    };
    // Names first, so references can be checked whatever the order in the file.
    let outbound_tbl = root
        .get("outbound")
        .and_then(|f| ctx.table(&f, "[outbound]".into()));
    let outbound_names: BTreeSet<String> = outbound_tbl
        .as_ref()
        .map(|t| t.fields().iter().map(|f| f.key.to_string()).collect())
        .unwrap_or_default();
    let mut outbound = BTreeMap::new();
    if let Some(t) = &outbound_tbl {
        for f in t.fields() {
            let valid = ctx.name(f.key, f.key_span.clone(), "outbound");
            if let Some(ot) = ctx.table(&f, format!("[outbound.{}]", f.key)) {
                if let Some(o) = outbound_cfg(&mut ctx, f.key, &ot) {
                    if valid {
                        outbound.insert(f.key.to_string(), o);
                    }
                }
            }
        }
    }
    let mut tenants = BTreeMap::new();
    if let Some(f) = root.get("tenants") {
        if let Some(t) = ctx.table(&f, "[tenants]".into()) {
            for f in t.fields() {
                let valid = ctx.name(f.key, f.key_span.clone(), "tenant");
                if let Some(tt) = ctx.table(&f, format!("[tenants.{}]", f.key)) {
                    let tenant = tenant(&mut ctx, f.key, &tt, &outbound_names);
                    if valid {
                        tenants.insert(f.key.to_string(), tenant);
                    }
                }
            }
        }
    }
    let dispatch_namespaces = match root.get("dispatch_namespaces") {
        Some(f) => namespaces(&mut ctx, &f, &outbound_names, &interceptor, &tenants),
        None => Vec::new(),
    };
    let section = root.get("interceptor");
    let user_given = section
        .as_ref()
        .and_then(|f| f.item.as_table_like())
        .is_some_and(|t| t.contains_key("sandbox_user"));
    if !user_given && (!tenants.is_empty() || !dispatch_namespaces.is_empty()) {
        default_sandbox_user(&mut ctx, section.as_ref().and_then(|f| f.span()));
    }
    if let Some(range) = interceptor.sandbox_uids {
        if (tenants.len() as u64) > range.size() {
            let span = section
                .as_ref()
                .and_then(|f| f.item.as_table_like())
                .and_then(|t| t.get("sandbox_uids"))
                .and_then(|item| item.span());
            ctx.error(
                span,
                format!(
                    "`sandbox_uids` {range} holds {} uid(s), fewer than the {} tenants configured (each tenant and each User Worker gets one of its own)",
                    range.size(),
                    tenants.len()
                ),
            );
        }
    }

    if !ctx.diags.is_empty() {
        let mut diags = ctx.diags;
        diags.sort_by_key(|(offset, _)| *offset);
        return Err(ConfigError {
            diagnostics: diags.into_iter().map(|(_, d)| d).collect(),
        });
    }
    Ok(Config {
        path: path.to_path_buf(),
        base_dir: ctx.base_dir,
        interceptor,
        resolve,
        tenants,
        dispatch_namespaces,
        outbound,
    })
}

fn interceptor(ctx: &mut Ctx<'_>, t: &Tbl<'_>) -> InterceptorConfig {
    ctx.check_keys(t, INTERCEPTOR_KEYS);
    let mut c = InterceptorConfig::default();
    if let Some(f) = t.get("relay") {
        if let Some(SocketAddr::V4(a)) = ctx.socket_addr(&f, true) {
            c.relay = a;
        }
    }
    if let Some(f) = t.get("dns") {
        if let Some(SocketAddr::V4(a)) = ctx.socket_addr(&f, true) {
            c.dns = a;
        }
    }
    if let Some(f) = t.get("metrics") {
        if let Some(a) = ctx.socket_addr(&f, false) {
            let taken = [
                (SocketAddr::from(c.relay), "the relay"),
                (c.relay_v6().into(), "the IPv6 relay"),
                (c.dns.into(), "the DNS server"),
                (c.dns_v6().into(), "the IPv6 DNS server"),
            ];
            match taken.iter().find(|(b, _)| collides(a, *b)) {
                Some((_, other)) => ctx.error(
                    f.span(),
                    format!("`metrics` address {a} is already used by {other}"),
                ),
                None => c.metrics = Some(a),
            }
        }
    }
    if c.relay == c.dns {
        let span = t
            .get("dns")
            .or_else(|| t.get("relay"))
            .map_or(t.span.clone(), |f| f.span());
        ctx.error(span, format!("`relay` and `dns` are both {}", c.relay));
    }
    if let Some(f) = t.get("admin_socket") {
        if let Some(p) = ctx.path(&f) {
            // sun_path holds 108 bytes including the terminating NUL.
            if p.as_os_str().len() > 107 {
                ctx.error(
                    f.span(),
                    format!(
                        "`admin_socket` path {} is longer than a Unix socket path may be (107 bytes)",
                        p.display()
                    ),
                );
            } else {
                c.admin_socket = p;
            }
        }
    }
    if let Some(f) = t.get("log_dir") {
        if let Some(p) = ctx.path(&f) {
            c.log_dir = p;
        }
    }
    if let Some(f) = t.get("state_dir") {
        if let Some(p) = ctx.path(&f) {
            // Created at start if missing; something else in its place is an error now.
            match std::fs::metadata(&p) {
                Ok(meta) if !meta.is_dir() => ctx.error(
                    f.span(),
                    format!("`state_dir`: {} is not a directory", p.display()),
                ),
                _ => c.state_dir = p,
            }
        }
    }
    if let Some(f) = t.get("cgroup") {
        if let Some(s) = ctx.string(&f) {
            let trimmed = s.trim_matches('/');
            let ok = !trimmed.is_empty()
                && trimmed.split('/').all(|part| {
                    !part.is_empty()
                        && !part.starts_with('.')
                        && !part.starts_with('-')
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                });
            if ok {
                c.cgroup = trimmed.to_string();
            } else {
                ctx.error(
                    f.span(),
                    format!("`cgroup`: \"{s}\" is not a cgroup path like \"interceptor\" (names of A-Z a-z 0-9 _ - . separated by `/`)"),
                );
            }
        }
    }
    if let Some(f) = t.get("sandbox_user") {
        if let Some(s) = ctx.string(&f) {
            let ok = !s.is_empty()
                && s.len() <= 32
                && !s.starts_with('-')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
            match ok.then(|| sandbox_user(&s)) {
                Some(Ok(name)) => c.sandbox_user = name,
                Some(Err(why)) => ctx.error(f.span(), format!("`sandbox_user`: {why}")),
                None => ctx.error(
                    f.span(),
                    format!("`sandbox_user`: \"{s}\" is not a user name or numeric uid"),
                ),
            }
        }
    }
    if let Some(f) = t.get("upstream_ca") {
        let list = match f.item.as_str() {
            Some(s) => Some(vec![(s.to_string(), f.span())]),
            None => ctx.strings(&f),
        };
        for (s, span) in list.unwrap_or_default() {
            if s.is_empty() {
                ctx.error(span, "`upstream_ca` entries must not be empty");
                continue;
            }
            let p = ctx.resolve_path(&s);
            match std::fs::read(&p) {
                Ok(bytes) if contains(&bytes, b"-----BEGIN CERTIFICATE-----") => {
                    c.upstream_ca.push(p)
                }
                Ok(_) => ctx.error(
                    span,
                    format!(
                        "`upstream_ca`: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                        p.display()
                    ),
                ),
                Err(e) => ctx.error(
                    span,
                    format!("`upstream_ca`: cannot read {}: {e}", p.display()),
                ),
            }
        }
    }
    if let Some(f) = t.get("log_max_bytes") {
        if let Some(n) = ctx.integer(&f, 1, i64::MAX) {
            c.log_max_bytes = n as u64;
        }
    }
    if let Some(f) = t.get("log_keep") {
        if let Some(n) = ctx.integer(&f, 0, 10_000) {
            c.log_keep = n as u32;
        }
    }
    if let Some(f) = t.get("max_connections_per_tenant") {
        if let Some(n) = ctx.integer(&f, 0, 1_000_000) {
            c.max_connections_per_tenant = (n > 0).then_some(n as usize);
        }
    }
    if let Some(f) = t.get("sandbox_uids") {
        if let Some(s) = ctx.string(&f) {
            match uid_range(&s).and_then(|range| {
                host_ids_in(range, &c.sandbox_user)?;
                Ok(range)
            }) {
                Ok(range) => c.sandbox_uids = Some(range),
                Err(why) => ctx.error(f.span(), format!("`sandbox_uids`: {why}")),
            }
        }
    }
    if let Some(f) = t.get("sandbox_limits") {
        if let Some(lt) = ctx.table(&f, "`sandbox_limits`".into()) {
            ctx.check_keys(&lt, SANDBOX_LIMIT_KEYS);
            // Below these, the Worker runtime (threads, memfds, sockets) cannot start.
            if let Some(f) = lt.get("nofile") {
                if let Some(n) = ctx.integer(&f, 64, 1 << 20) {
                    c.sandbox_limits.nofile = n as u64;
                }
            }
            if let Some(f) = lt.get("nproc") {
                if let Some(n) = ctx.integer(&f, 16, 1 << 22) {
                    c.sandbox_limits.nproc = n as u64;
                }
            }
        }
    }
    if let Some(f) = t.get("dns_forwarders") {
        let mut forwarders = Vec::new();
        for (s, span) in ctx.strings(&f).unwrap_or_default() {
            // A bare address means port 53, as in resolv.conf.
            let addr = s
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match addr {
                Some(a) if a.port() != 0 => forwarders.push(a),
                _ => ctx.error(
                    span,
                    format!("`dns_forwarders`: \"{s}\" is not an address like \"10.0.0.2\" or \"127.0.0.2:5353\""),
                ),
            }
        }
        c.dns_forwarders = Some(forwarders);
    }
    if let Some(f) = t.get("dns_max_in_flight_per_tenant") {
        if let Some(n) = ctx.integer(&f, 0, 1_000_000) {
            c.dns_max_in_flight_per_tenant = (n > 0).then_some(n as usize);
        }
    }
    c
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn resolve(ctx: &mut Ctx<'_>, t: &Tbl<'_>) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for f in t.fields() {
        let name = match HostPattern::parse(f.key) {
            Ok(HostPattern::Exact(n)) => Some(n),
            Ok(HostPattern::Wildcard(_)) => {
                ctx.error(
                    f.key_span.clone(),
                    format!(
                        "[resolve]: `{}`: wildcards are not supported here; list each name",
                        f.key
                    ),
                );
                None
            }
            Ok(HostPattern::Ip(_)) => {
                ctx.error(
                    f.key_span.clone(),
                    format!("[resolve]: `{}` is an address, not a host name", f.key),
                );
                None
            }
            Err(e) => {
                ctx.error(f.key_span.clone(), format!("[resolve]: {e}"));
                None
            }
        };
        let list = match f.item.as_str() {
            Some(s) => Some(vec![(s.to_string(), f.span())]),
            None => ctx.strings(&f),
        };
        let Some(list) = list else { continue };
        if list.is_empty() && f.item.as_array().is_some_and(|a| a.is_empty()) {
            ctx.error(
                f.span(),
                format!("[resolve]: `{}` needs at least one address", f.key),
            );
            continue;
        }
        let mut addrs = Vec::new();
        for (s, span) in list {
            match s
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            {
                Ok(ip) => addrs.push(ip),
                Err(_) => ctx.error(span, format!("[resolve]: \"{s}\" is not an IP address")),
            }
        }
        if let Some(name) = name {
            match out.entry(name) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    let msg = format!("[resolve]: `{}` is listed twice", e.key());
                    ctx.error(f.key_span.clone(), msg);
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(addrs);
                }
            }
        }
    }
    out
}

fn tenant(
    ctx: &mut Ctx<'_>,
    name: &str,
    t: &Tbl<'_>,
    outbounds: &BTreeSet<String>,
) -> TenantConfig {
    ctx.check_keys(t, TENANT_KEYS);
    let outbound = t.get("outbound").and_then(|f| {
        let s = ctx.string(&f)?;
        ctx.outbound_ref(&s, f.span(), outbounds)
    });
    let mut params = BTreeMap::new();
    if let Some(f) = t.get("params") {
        if let Some(pt) = ctx.table(&f, format!("[tenants.{name}].params")) {
            for pf in pt.fields() {
                if !is_param_name(pf.key) {
                    ctx.error(
                        pf.key_span.clone(),
                        format!(
                            "invalid parameter name `{}`: use letters, digits, `_`, `-`, `.`",
                            pf.key
                        ),
                    );
                }
                if let Some(v) = ctx.string(&pf) {
                    params.insert(pf.key.to_string(), v);
                }
            }
        }
    }
    TenantConfig {
        name: name.to_string(),
        outbound,
        params,
    }
}

/// Whether two listening addresses would collide (same port, same or wildcard address).
fn collides(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && (a.ip() == b.ip()
            || (a.ip().is_unspecified() && (a.is_ipv4() == b.is_ipv4() || a.is_ipv6()))
            || (b.ip().is_unspecified() && (a.is_ipv4() == b.is_ipv4() || b.is_ipv6())))
}

fn namespaces(
    ctx: &mut Ctx<'_>,
    f: &Field<'_>,
    outbounds: &BTreeSet<String>,
    ic: &InterceptorConfig,
    tenants: &BTreeMap<String, TenantConfig>,
) -> Vec<DispatchNamespace> {
    let mut out = Vec::new();
    let mut listens: Vec<(SocketAddr, String)> = vec![
        (ic.relay.into(), "the relay".into()),
        (ic.relay_v6().into(), "the IPv6 relay".into()),
        (ic.dns.into(), "the DNS server".into()),
        (ic.dns_v6().into(), "the IPv6 DNS server".into()),
    ];
    if let Some(metrics) = ic.metrics {
        listens.push((metrics, "the metrics listener".into()));
    }
    let mut names = BTreeSet::new();
    for t in ctx.tables(f, "[[dispatch_namespaces]]") {
        ctx.check_keys(&t, NAMESPACE_KEYS);
        let namespace = match t.get("namespace") {
            Some(nf) => ctx.string(&nf).and_then(|n| {
                if !ctx.name(&n, nf.span(), "namespace") {
                    None
                } else if !names.insert(n.clone()) {
                    ctx.error(
                        nf.span(),
                        format!("dispatch namespace `{n}` is defined twice"),
                    );
                    None
                } else if tenants.contains_key(&n) {
                    // Both would own the cgroup `<cgroup>/<name>`.
                    ctx.error(
                        nf.span(),
                        format!("dispatch namespace `{n}` has the name of a tenant; they share the cgroup namespace"),
                    );
                    None
                } else {
                    Some(n)
                }
            }),
            None => {
                ctx.missing(&t, "namespace");
                None
            }
        };
        let label = namespace
            .as_ref()
            .map_or_else(|| t.what.clone(), |n| format!("dispatch namespace `{n}`"));
        let tl = Tbl {
            t: t.t,
            span: t.span.clone(),
            what: label.clone(),
        };
        let binding = match tl.get("binding") {
            Some(bf) => ctx.string(&bf).and_then(|b| {
                if b.is_empty() {
                    ctx.error(bf.span(), "`binding` must not be empty");
                    None
                } else {
                    Some(b)
                }
            }),
            None => Some(DEFAULT_BINDING.to_string()),
        };
        let listen = match tl.get("listen") {
            Some(lf) => ctx.socket_addr(&lf, false).and_then(|a| {
                if let Some((_, other)) = listens.iter().find(|(b, _)| collides(a, *b)) {
                    ctx.error(
                        lf.span(),
                        format!("`listen` address {a} is already used by {other}"),
                    );
                    None
                } else {
                    listens.push((a, label.clone()));
                    Some(a)
                }
            }),
            None => {
                ctx.missing(&tl, "listen");
                None
            }
        };
        let workers = match tl.get("workers") {
            Some(wf) => ctx.path(&wf),
            None => {
                ctx.missing(&tl, "workers");
                None
            }
        };
        let outbound = tl
            .get("outbound")
            .and_then(|of| ns_outbound(ctx, &of, &label, outbounds));
        let limits = tl
            .get("limits")
            .and_then(|lf| {
                let lt = ctx.table(&lf, format!("`limits` of {label}"))?;
                ctx.check_keys(&lt, LIMIT_KEYS);
                let mut l = Limits::default();
                let mut get = |key: &str| {
                    lt.get(key)
                        .and_then(|f| ctx.integer(&f, 1, i64::MAX))
                        .map(|n| n as u64)
                };
                l.cpu_ms = get("cpu_ms");
                l.memory_mb = get("memory_mb");
                l.subrequests = get("subrequests");
                Some(l)
            })
            .unwrap_or_default();
        // 0: Worker processes are never stopped for being idle.
        let idle_timeout = match tl.get("idle_timeout_seconds") {
            Some(f) => ctx.integer(&f, 0, i64::from(u32::MAX)).map(|n| n as u64),
            None => Some(DEFAULT_IDLE_TIMEOUT_SECONDS),
        }
        .map(|secs| (secs > 0).then(|| std::time::Duration::from_secs(secs)));
        if let (Some(binding), Some(namespace), Some(listen), Some(workers), Some(idle_timeout)) =
            (binding, namespace, listen, workers, idle_timeout)
        {
            out.push(DispatchNamespace {
                binding,
                namespace,
                listen,
                workers,
                outbound,
                limits,
                idle_timeout,
            });
        }
    }
    out
}

fn ns_outbound(
    ctx: &mut Ctx<'_>,
    f: &Field<'_>,
    label: &str,
    outbounds: &BTreeSet<String>,
) -> Option<NamespaceOutbound> {
    if let Some(s) = f.item.as_str() {
        let service = ctx.outbound_ref(s, f.span(), outbounds)?;
        return Some(NamespaceOutbound {
            service,
            parameters: Vec::new(),
        });
    }
    let t = ctx.table(f, format!("`outbound` of {label}"))?;
    ctx.check_keys(&t, NS_OUTBOUND_KEYS);
    let service = match t.get("service") {
        Some(sf) => ctx
            .string(&sf)
            .and_then(|s| ctx.outbound_ref(&s, sf.span(), outbounds)),
        None => {
            ctx.missing(&t, "service");
            None
        }
    };
    let mut parameters = Vec::new();
    if let Some(pf) = t.get("parameters") {
        for (p, span) in ctx.strings(&pf).unwrap_or_default() {
            if !DISPATCH_PARAMETERS.contains(&p.as_str()) {
                ctx.error(
                    span,
                    format!(
                        "unknown dispatch parameter `{p}`; a dispatcher passes {}",
                        DISPATCH_PARAMETERS.join(" and ")
                    ),
                );
            } else if !parameters.contains(&p) {
                parameters.push(p);
            }
        }
    }
    Some(NamespaceOutbound {
        service: service?,
        parameters,
    })
}

fn outbound_cfg(ctx: &mut Ctx<'_>, name: &str, t: &Tbl<'_>) -> Option<OutboundConfig> {
    ctx.check_keys(t, OUTBOUND_KEYS);
    let mut ok = true;
    let default = match t.get("default") {
        Some(f) => match ctx.string(&f) {
            Some(s) => match s.parse::<Action>() {
                Ok(a) => a,
                Err(e) => {
                    ctx.error(f.span(), format!("`default`: {e}"));
                    ok = false;
                    Action::Allow
                }
            },
            None => {
                ok = false;
                Action::Allow
            }
        },
        None => Action::Allow,
    };
    let mut patterns = |ctx: &mut Ctx<'_>, key: &str| -> Vec<HostPattern> {
        let mut out = Vec::new();
        if let Some(f) = t.get(key) {
            for (s, span) in ctx.strings(&f).unwrap_or_default() {
                match HostPattern::parse(&s) {
                    Ok(p) => out.push(p),
                    Err(e) => {
                        ctx.error(span, format!("`{key}`: {e}"));
                        ok = false;
                    }
                }
            }
        }
        out
    };
    let allow = patterns(ctx, "allow");
    let block = patterns(ctx, "block");
    let mut allow_cidrs = Vec::new();
    if let Some(f) = t.get("allow_cidrs") {
        for (s, span) in ctx.strings(&f).unwrap_or_default() {
            match parse_cidr(&s) {
                Ok(n) => allow_cidrs.push(n),
                Err(e) => {
                    ctx.error(span, format!("`allow_cidrs`: {e}"));
                    ok = false;
                }
            }
        }
    }
    let log = match t.get("log") {
        Some(f) => ctx.boolean(&f).unwrap_or(true),
        None => true,
    };
    let mut inject = Vec::new();
    if let Some(f) = t.get("inject") {
        for it in ctx.tables(&f, &format!("[[outbound.{name}.inject]]")) {
            match injection(ctx, &it) {
                Some(i) => inject.push(i),
                None => ok = false,
            }
        }
    }
    ok.then(|| OutboundConfig {
        name: name.to_string(),
        default,
        allow,
        block,
        allow_cidrs,
        log,
        inject,
    })
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "\"{s}\" has host bits set; did you mean \"{}\" or \"{}/{}\"?",
                net.trunc(),
                net.addr(),
                net.max_prefix_len()
            ));
        }
        return Ok(net);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "\"{s}\" is not a CIDR like \"10.0.0.0/8\" or \"fd00::/8\" (or a single address)"
    ))
}

fn injection(ctx: &mut Ctx<'_>, t: &Tbl<'_>) -> Option<InjectConfig> {
    ctx.check_keys(t, INJECT_KEYS);
    let host = match t.get("host") {
        Some(f) => ctx.string(&f).and_then(|s| match HostPattern::parse(&s) {
            Ok(p) => Some(p),
            Err(e) => {
                ctx.error(f.span(), format!("`host`: {e}"));
                None
            }
        }),
        None => {
            ctx.missing(t, "host");
            None
        }
    };
    let header = match t.get("header") {
        Some(f) => ctx
            .string(&f)
            .and_then(|s| match HeaderName::from_bytes(s.as_bytes()) {
                Ok(h) if FORBIDDEN_HEADERS.contains(&h.as_str()) => {
                    ctx.error(
                        f.span(),
                        format!("`header`: `{s}` is managed by the relay and cannot be injected"),
                    );
                    None
                }
                Ok(h) => Some(h),
                Err(_) => {
                    ctx.error(
                        f.span(),
                        format!("`header`: \"{s}\" is not a valid HTTP header name"),
                    );
                    None
                }
            }),
        None => {
            ctx.missing(t, "header");
            None
        }
    };
    let value = t.get("value");
    let jwt = t.get("jwt");
    let source = match (value, jwt) {
        (Some(_), Some(jf)) => {
            let msg = format!("{} has both `value` and `jwt`; give exactly one", t.what);
            ctx.error(jf.key_span.clone(), msg);
            None
        }
        (None, None) => {
            let msg = format!("{} needs `value` or `jwt`", t.what);
            ctx.error(t.span.clone(), msg);
            None
        }
        (Some(vf), None) => ctx.string(&vf).and_then(|s| match Template::parse(&s) {
            Ok(tpl) => Some(InjectSource::Value(tpl)),
            Err(e) => {
                ctx.error(vf.span(), format!("`value`: {e}"));
                None
            }
        }),
        (None, Some(jf)) => {
            let what = format!("`jwt` of {}", t.what);
            ctx.table(&jf, what)
                .and_then(|jt| jwt_cfg(ctx, &jt))
                .map(InjectSource::Jwt)
        }
    };
    Some(InjectConfig {
        host: host?,
        header: header?,
        source: source?,
    })
}

fn jwt_cfg(ctx: &mut Ctx<'_>, t: &Tbl<'_>) -> Option<JwtConfig> {
    ctx.check_keys(t, JWT_KEYS);
    let algorithm = match t.get("algorithm") {
        Some(f) => ctx.string(&f).and_then(|s| match parse_algorithm(&s) {
            Some(a) => Some((a, f.span())),
            None => {
                ctx.error(
                    f.span(),
                    format!(
                        "unknown JWT algorithm `{s}`; expected one of: {}",
                        ALGORITHMS.join(", ")
                    ),
                );
                None
            }
        }),
        None => {
            ctx.missing(t, "algorithm");
            None
        }
    };
    let key_file = match t.get("key_file") {
        Some(f) => ctx.path(&f).map(|p| (p, f.span())),
        None => {
            ctx.missing(t, "key_file");
            None
        }
    };
    let mut key_ok = true;
    if let (Some((alg, _)), Some((path, span))) = (&algorithm, &key_file) {
        if let Err(e) = load_key(*alg, path) {
            ctx.error(span.clone(), format!("`key_file`: {e}"));
            key_ok = false;
        }
    }
    let ttl_seconds = match t.get("ttl_seconds") {
        Some(f) => ctx.integer(&f, 1, 10 * 365 * 86_400).map(|n| n as u64),
        None => Some(DEFAULT_JWT_TTL_SECONDS),
    };
    let claims = match t.get("claims") {
        Some(f) => match f.item.as_table_like() {
            Some(ct) => {
                let tbl = Tbl {
                    t: ct,
                    span: f.span(),
                    what: "`claims`".into(),
                };
                let mut map = serde_json::Map::new();
                let mut ok = true;
                for cf in tbl.fields() {
                    if matches!(cf.key, "iat" | "exp") {
                        ctx.error(
                            cf.key_span.clone(),
                            format!(
                                "claim `{}` is set by the interceptor (iat = now, exp = iat + ttl_seconds)",
                                cf.key
                            ),
                        );
                        ok = false;
                        continue;
                    }
                    match claim_item(ctx, cf.item, cf.span()) {
                        Some(v) => {
                            map.insert(cf.key.to_string(), v);
                        }
                        None => ok = false,
                    }
                }
                ok.then_some(map)
            }
            None => {
                let msg = format!("`claims` must be a table, not {}", type_name(f.item));
                ctx.error(f.span(), msg);
                None
            }
        },
        None => Some(serde_json::Map::new()),
    };
    let kid = t.get("kid").and_then(|f| ctx.string(&f));
    if !key_ok || (t.get("kid").is_some() && kid.is_none()) {
        return None;
    }
    Some(JwtConfig {
        algorithm: algorithm?.0,
        key_file: key_file?.0,
        ttl_seconds: ttl_seconds?,
        claims: claims?,
        kid,
    })
}

fn claim_item(ctx: &mut Ctx<'_>, item: &Item, span: Span) -> Option<serde_json::Value> {
    match item {
        Item::Value(v) => claim_value(ctx, v),
        Item::Table(t) => claim_table(ctx, t),
        Item::ArrayOfTables(a) => {
            let mut out = Vec::new();
            let mut ok = true;
            for t in a.iter() {
                match claim_table(ctx, t) {
                    Some(v) => out.push(v),
                    None => ok = false,
                }
            }
            ok.then_some(serde_json::Value::Array(out))
        }
        Item::None => {
            ctx.error(span, "empty claim");
            None
        }
    }
}

fn claim_table(ctx: &mut Ctx<'_>, t: &dyn TableLike) -> Option<serde_json::Value> {
    let mut map = serde_json::Map::new();
    let mut ok = true;
    for (k, item) in t.iter() {
        let span = item.span().or_else(|| t.key(k).and_then(|k| k.span()));
        match claim_item(ctx, item, span) {
            Some(v) => {
                map.insert(k.to_string(), v);
            }
            None => ok = false,
        }
    }
    ok.then_some(serde_json::Value::Object(map))
}

fn claim_value(ctx: &mut Ctx<'_>, v: &Value) -> Option<serde_json::Value> {
    use serde_json::Value as J;
    Some(match v {
        Value::String(s) => {
            if let Err(e) = Template::parse(s.value()) {
                ctx.error(v.span(), format!("claim template: {e}"));
                return None;
            }
            J::String(s.value().clone())
        }
        Value::Integer(i) => J::from(*i.value()),
        Value::Float(x) => match serde_json::Number::from_f64(*x.value()) {
            Some(n) => J::Number(n),
            None => {
                ctx.error(v.span(), "a claim cannot be NaN or infinite");
                return None;
            }
        },
        Value::Boolean(b) => J::Bool(*b.value()),
        Value::Datetime(d) => J::String(d.value().to_string()),
        Value::Array(a) => {
            let mut out = Vec::new();
            let mut ok = true;
            for e in a.iter() {
                match claim_value(ctx, e) {
                    Some(j) => out.push(j),
                    None => ok = false,
                }
            }
            if !ok {
                return None;
            }
            J::Array(out)
        }
        Value::InlineTable(t) => return claim_table(ctx, t),
    })
}

/// `"FIRST-LAST"`, neither of them 0 (root) nor 4294967295 (`(uid_t)-1`, "no
/// change" to setuid-family calls).
fn uid_range(s: &str) -> Result<UidRange, String> {
    let bad = || format!("\"{s}\" is not a range of uids like \"200000-200999\"");
    let (first, last) = s.split_once('-').ok_or_else(bad)?;
    let number = |n: &str| {
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        n.parse::<u32>().map_err(|_| bad())
    };
    let (first, last) = (number(first)?, number(last)?);
    if first == 0 {
        return Err(format!("\"{s}\" includes uid 0, root"));
    }
    if last == u32::MAX {
        return Err(format!(
            "\"{s}\" includes 4294967295, which is no uid (it is (uid_t)-1)"
        ));
    }
    if first > last {
        return Err(format!("\"{s}\": {first} is above {last}"));
    }
    Ok(UidRange { first, last })
}

/// Refuses a range that holds an id this host already uses: a user's uid or a
/// group's gid (a sandbox would get that user's files, or that group's by its
/// gid), the sandbox user's, or a subordinate-id range that rootless
/// containers map their users to. Reads the local databases: accounts only
/// a network directory knows are skipped when uids are handed out.
fn host_ids_in(range: UidRange, sandbox_user: &str) -> Result<(), String> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    if let Some(user) = nix::unistd::User::from_name(sandbox_user).ok().flatten() {
        if range.contains(user.uid.as_raw()) || range.contains(user.gid.as_raw()) {
            return Err(format!(
                "{range} includes the sandbox user {sandbox_user}'s uid {} or gid {}",
                user.uid, user.gid
            ));
        }
    }
    match ids_in_use(
        range,
        &read("/etc/passwd"),
        &read("/etc/group"),
        &read("/etc/subuid"),
        &read("/etc/subgid"),
    ) {
        Some(what) => Err(format!(
            "{range} includes {what}: pick ids no user, group or subordinate-id range of this host has"
        )),
        None => Ok(()),
    }
}

/// The first id of `range` that the given `/etc/passwd`, `/etc/group`,
/// `/etc/subuid` and `/etc/subgid` texts use, described.
pub(super) fn ids_in_use(
    range: UidRange,
    passwd: &str,
    group: &str,
    subuid: &str,
    subgid: &str,
) -> Option<String> {
    let fields = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()
    };
    for entry in fields(passwd) {
        if let Some(uid) = entry.get(2).and_then(|n| n.parse::<u32>().ok()) {
            if range.contains(uid) {
                return Some(format!("uid {uid} of user {} (/etc/passwd)", entry[0]));
            }
        }
    }
    for entry in fields(group) {
        if let Some(gid) = entry.get(2).and_then(|n| n.parse::<u32>().ok()) {
            if range.contains(gid) {
                return Some(format!("gid {gid} of group {} (/etc/group)", entry[0]));
            }
        }
    }
    for (text, file) in [(subuid, "/etc/subuid"), (subgid, "/etc/subgid")] {
        for entry in fields(text) {
            let start = entry.get(1).and_then(|n| n.parse::<u64>().ok());
            let count = entry.get(2).and_then(|n| n.parse::<u64>().ok());
            if let (Some(start), Some(count)) = (start, count) {
                let end = start + count;
                if count > 0 && start <= u64::from(range.last) && end > u64::from(range.first) {
                    return Some(format!(
                        "{}'s subordinate ids {start}-{} ({file})",
                        entry[0],
                        end - 1
                    ));
                }
            }
        }
    }
    None
}

/// Without `sandbox_user`, the default account must exist all the same when
/// anything runs sandboxed: `exec` and every Worker would fail on it later.
/// `span` is the `[interceptor]` table's.
fn default_sandbox_user(ctx: &mut Ctx<'_>, span: Span) {
    if let Err(why) = sandbox_user(DEFAULT_SANDBOX_USER) {
        ctx.error(
            span,
            format!("`sandbox_user` is not set and its default does not fit: {why}; set `sandbox_user` in [interceptor]"),
        );
    }
}

/// The account sandboxed processes run as, by name or numeric uid: it must exist
/// here, and must not be root (a root sandbox could leave its cgroup and reach the
/// admin socket).
fn sandbox_user(given: &str) -> Result<String, String> {
    use nix::unistd::{Uid, User};
    let user = match given.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(given),
    }
    .map_err(|e| format!("cannot look up user \"{given}\": {e}"))?
    .ok_or_else(|| format!("no such user \"{given}\" on this host"))?;
    if user.uid.is_root() {
        return Err(format!(
            "\"{given}\" is root; sandboxed processes must run as an unprivileged user"
        ));
    }
    Ok(user.name)
}
