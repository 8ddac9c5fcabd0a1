//! Text for people: times, durations, sizes, outcomes, and aligned tables.

use std::io::{self, Write};

use duraflow_rs::{AttemptOutcome, AttemptRecord, RunRecord, RunStatus};

/// `ms` since the Unix epoch as UTC ISO-8601, to the second: `2025-11-26T08:46:12Z`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// A duration given in microseconds, short and readable: `850µs`, `12.3ms`, `4.56s`,
/// `3m07s`, `2h05m`, `1d04h`.
pub fn duration_us(us: u64) -> String {
    const S: u64 = 1_000_000;
    match us {
        0..1_000 => format!("{us}µs"),
        1_000..1_000_000 => format!("{:.1}ms", us as f64 / 1e3),
        1_000_000..60_000_000 => format!("{:.2}s", us as f64 / 1e6),
        _ => {
            let s = us / S;
            match s {
                0..3_600 => format!("{}m{:02}s", s / 60, s % 60),
                3_600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
                _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
            }
        }
    }
}

/// A duration given in milliseconds (see [`duration_us`]), whole below a second: `113ms`.
pub fn duration_ms(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    duration_us(ms.saturating_mul(1000))
}

/// A size in bytes: `87 B`, `3.4 KiB`, `1.2 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `n thing` or `n things`.
pub fn count(n: impl Into<u64>, thing: &str) -> String {
    let n = n.into();
    format!("{n} {thing}{}", if n == 1 { "" } else { "s" })
}

/// A run's status in lower case.
pub fn status(s: RunStatus) -> &'static str {
    match s {
        RunStatus::Running => "running",
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Interrupted => "interrupted",
        _ => "unknown",
    }
}

/// An attempt's outcome in one word; a `Succeeded` attempt is one whose task executed.
pub fn outcome(o: &AttemptOutcome) -> &'static str {
    match o {
        AttemptOutcome::Running => "running",
        AttemptOutcome::Succeeded => "executed",
        AttemptOutcome::Cached => "cached",
        AttemptOutcome::Failed { .. } => "failed",
        AttemptOutcome::Interrupted => "interrupted",
        _ => "unknown",
    }
}

/// The error of a failed attempt.
pub fn error(o: &AttemptOutcome) -> Option<&str> {
    match o {
        AttemptOutcome::Failed { error } => Some(error),
        _ => None,
    }
}

/// Why an attempt ran or was cached: the reason recorded with it (tasks added with
/// `add_keyed`), `cached by id` for a cached attempt without one (tasks added with `add`),
/// `None` otherwise.
pub fn why(a: &AttemptRecord) -> Option<&str> {
    match (a.reason.as_deref(), &a.outcome) {
        (Some(reason), _) if !reason.is_empty() => Some(reason),
        (_, AttemptOutcome::Cached) => Some("cached by id"),
        _ => None,
    }
}

/// Whether an attempt ended on its own (its end time is when it ended, not when the store
/// found it cut off).
pub fn ended(a: &AttemptRecord) -> bool {
    !matches!(
        a.outcome,
        AttemptOutcome::Running | AttemptOutcome::Interrupted
    )
}

/// When an attempt that ended did, in ms since the epoch (its start plus its duration where
/// known, which is finer than its end time).
pub fn attempt_end_ms(a: &AttemptRecord) -> u64 {
    match (a.duration_us, a.finished_ms) {
        (Some(us), _) => a.started_ms + us.div_ceil(1000),
        (None, Some(f)) => f.max(a.started_ms),
        (None, None) => a.started_ms,
    }
}

/// How long an attempt took, in µs, when it ended.
pub fn attempt_duration_us(a: &AttemptRecord) -> Option<u64> {
    if !ended(a) {
        return None;
    }
    a.duration_us.or_else(|| {
        a.finished_ms
            .map(|f| f.saturating_sub(a.started_ms).saturating_mul(1000))
    })
}

/// How long a run took in ms, and whether that is only a lower bound: an interrupted (or
/// still running) run's end is unknown, so its duration runs up to its last recorded
/// activity. `attempts` are needed only for those.
pub fn run_duration(run: &RunRecord, attempts: &[AttemptRecord]) -> (u64, bool) {
    match (run.status, run.finished_ms) {
        (RunStatus::Succeeded | RunStatus::Failed, Some(f)) => {
            (f.saturating_sub(run.started_ms), false)
        }
        _ => (
            last_activity(run, attempts).saturating_sub(run.started_ms),
            true,
        ),
    }
}

/// The latest moment anything of the run is known to have happened.
pub fn last_activity(run: &RunRecord, attempts: &[AttemptRecord]) -> u64 {
    attempts
        .iter()
        .map(|a| {
            if ended(a) {
                attempt_end_ms(a)
            } else {
                a.started_ms
            }
        })
        .fold(run.started_ms, u64::max)
}

/// `s` with control characters (newlines, NUL, …) escaped, so it stays on one line of a
/// terminal and cannot move the cursor.
pub fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// How a table column is aligned.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Writes `rows` under `headers`, columns two spaces apart; the last column is not padded.
pub fn table(
    out: &mut dyn Write,
    headers: &[&str],
    align: &[Align],
    rows: &[Vec<String>],
) -> io::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let last = i + 1 == headers.len();
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                text.push_str("  ");
            }
            let right = align.get(i) == Some(&Align::Right);
            if right {
                text.extend(std::iter::repeat_n(' ', pad));
            }
            text.push_str(cell);
            if !right && !last {
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.truncate(text.trim_end().len());
        text
    };
    writeln!(out, "{}", line(&mut headers.iter().copied()))?;
    for row in rows {
        writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_764_146_772_999), "2025-11-26T08:46:12Z");
        assert_eq!(utc(4_107_542_399_000), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn durations() {
        assert_eq!(duration_us(0), "0µs");
        assert_eq!(duration_us(999), "999µs");
        assert_eq!(duration_us(12_345), "12.3ms");
        assert_eq!(duration_us(4_560_000), "4.56s");
        assert_eq!(duration_ms(113), "113ms");
        assert_eq!(duration_ms(1_500), "1.50s");
        assert_eq!(duration_ms(187_000), "3m07s");
        assert_eq!(duration_ms(7_500_000), "2h05m");
        assert_eq!(duration_ms(100_800_000), "1d04h");
    }

    #[test]
    fn sizes_and_escapes() {
        assert_eq!(bytes(87), "87 B");
        assert_eq!(bytes(3482), "3.4 KiB");
        assert_eq!(bytes(5 << 20), "5.0 MiB");
        assert_eq!(printable("a\nb\0"), "a\\nb\\u{0}");
        assert_eq!(count(1u64, "run"), "1 run");
        assert_eq!(count(2u64, "run"), "2 runs");
    }

    #[test]
    fn tables_align() {
        let mut out = Vec::new();
        let rows = vec![
            vec!["1".to_owned(), "ok".to_owned(), "".to_owned()],
            vec!["10".to_owned(), "failed".to_owned(), "boom".to_owned()],
        ];
        table(
            &mut out,
            &["RUN", "STATUS", "ERROR"],
            &[Align::Right, Align::Left, Align::Left],
            &rows,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "RUN  STATUS  ERROR\n  1  ok\n 10  failed  boom\n"
        );
    }
}
