//! The human-readable table of `interceptor logs`.
//!
//! Columns have fixed widths so rows line up while streaming (`--follow`) without
//! reading everything first; long values are cut with `…`. Control characters (which a
//! tenant could put in a URL or host to play tricks on a terminal) are shown as `?`.

use std::fmt::Write as _;

use super::entry::format_ts;
use super::{LogEntry, Proto};

/// (title, width, right-aligned); the last column is not padded.
const COLUMNS: &[(&str, usize, bool)] = &[
    ("TIME", 24, false),
    ("TENANT", 14, false),
    ("PROTO", 5, false),
    ("DECISION", 8, false),
    ("STATUS", 6, true),
    ("METHOD", 7, false),
    ("HOST", 30, false),
    ("URL/DST", 40, false),
    ("RULE", 24, false),
    ("DURATION", 8, true),
    ("ERROR", 80, false),
];

/// The table's header line.
pub fn table_header() -> String {
    let titles: Vec<String> = COLUMNS.iter().map(|c| c.0.to_owned()).collect();
    render(&titles)
}

/// One entry as a table line: TIME (UTC), TENANT, PROTO, DECISION, STATUS, METHOD, HOST,
/// URL/DST (the URL for HTTP, else the destination asked for), RULE, DURATION, ERROR.
pub fn table_row(e: &LogEntry) -> String {
    let dash = || "-".to_owned();
    let target = match (&e.proto, &e.url) {
        (Proto::Http, Some(url)) => super::redact_url(url).into_owned(),
        _ => e.dst.clone(),
    };
    let cells = vec![
        format_ts(e.ts),
        e.tenant.clone(),
        e.proto.to_string(),
        e.decision.to_string(),
        e.status.map_or_else(dash, |s| s.to_string()),
        e.method.clone().unwrap_or_else(dash),
        e.host.clone().unwrap_or_else(dash),
        target,
        if e.rule.is_empty() {
            dash()
        } else {
            e.rule.clone()
        },
        format!("{}ms", e.duration_ms),
        e.error.clone().unwrap_or_else(dash),
    ];
    render(&cells)
}

fn render(cells: &[String]) -> String {
    let mut line = String::new();
    for (i, (cell, &(_, width, right))) in cells.iter().zip(COLUMNS).enumerate() {
        let last = i + 1 == COLUMNS.len();
        let text = fit(cell, width);
        if i > 0 {
            line.push_str("  ");
        }
        if last && !right {
            line.push_str(&text);
        } else if right {
            let _ = write!(line, "{text:>width$}");
        } else {
            let _ = write!(line, "{text:<width$}");
        }
    }
    line
}

/// `s` with control characters replaced, cut to at most `width` characters.
fn fit(s: &str, width: usize) -> String {
    let clean = s.chars().map(|c| if c.is_control() { '?' } else { c });
    let n = s.chars().count();
    if n <= width {
        clean.collect()
    } else {
        let mut t: String = clean.take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}
