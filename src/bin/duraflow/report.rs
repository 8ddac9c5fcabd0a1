//! `duraflow report`: one self-contained HTML page (inline CSS, SVG and a few lines of
//! script; nothing fetched) with a timeline of a run's task attempts and a table of them
//! (with why each ran or was cached, see [`text::why`]).
//!
//! Every bar is an SVG `rect` of class `bar` with `data-key` and `data-outcome`; a script
//! at the end of the page counts the bars the browser laid out with a non-zero size into
//! `#rendered[data-bars]` (the CLI's tests read it back from headless Chromium).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use duraflow_rs::{AttemptRecord, RunDetails};

use crate::text;

/// The narrowest bar, in percent of the timeline's width, so a cached task of a few
/// microseconds still shows.
const MIN_BAR: f64 = 0.3;

/// `s` escaped for HTML text and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab and newline are not allowed in HTML.
            c if c.is_control() && c != '\n' && c != '\t' => {
                out.push_str(&c.escape_default().to_string())
            }
            c => out.push(c),
        }
    }
    out
}

/// A step for time-axis ticks over `span_ms`: 1, 2 or 5 × a power of ten, at most ~8 ticks.
fn tick_step(span_ms: u64) -> u64 {
    let mut step = 1u64;
    loop {
        for m in [1, 2, 5] {
            if span_ms / (step * m) <= 8 {
                return step * m;
            }
        }
        step *= 10;
    }
}

/// The page for run `d` of the store at `store`.
pub fn html(store: &Path, d: &RunDetails) -> String {
    let run = &d.run;
    let status = text::status(run.status);
    let (run_ms, at_least) = text::run_duration(run, &d.attempts);
    let last = text::last_activity(run, &d.attempts);
    let t0 = d
        .attempts
        .iter()
        .map(|a| a.started_ms)
        .fold(run.started_ms, u64::min);
    let t1 = match (run.status, run.finished_ms) {
        (duraflow_rs::RunStatus::Succeeded | duraflow_rs::RunStatus::Failed, Some(f)) => {
            f.max(last)
        }
        _ => last,
    };
    let span = t1.saturating_sub(t0).max(1);
    let pct = |ms: u64| ms.saturating_sub(t0) as f64 * 100.0 / span as f64;

    // One row per task, in the order the tasks first started.
    let mut rows: BTreeMap<&str, Vec<&AttemptRecord>> = BTreeMap::new();
    for a in &d.attempts {
        rows.entry(a.key.as_str()).or_default().push(a);
    }
    let mut rows: Vec<(&str, Vec<&AttemptRecord>)> = rows.into_iter().collect();
    for (_, attempts) in &mut rows {
        attempts.sort_by_key(|a| a.attempt);
    }
    rows.sort_by_key(|(key, attempts)| (attempts.first().map_or(0, |a| a.started_ms), *key));

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for a in &d.attempts {
        *counts.entry(text::outcome(&a.outcome)).or_default() += 1;
    }

    let mut h = String::with_capacity(4096 + d.attempts.len() * 700);
    let title = format!("duraflow run {} — {status}", run.id);
    let _ = write!(
        h,
        r##"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{CSS}</style>
</head>
<body>
<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>
<pattern id="stripes" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="6" height="6" fill="#f59f00"/><rect width="3" height="6" fill="#ffd8a8"/></pattern>
</defs></svg>
<header>
<h1>Run {id} <span class="badge o-{status}">{status}</span></h1>
<p class="meta">store <code>{store}</code> · started {started} · took {took}{version}</p>
<ul class="counts">"##,
        title = esc(&title),
        id = run.id,
        store = esc(&crate::open::shown(store)),
        started = text::utc(run.started_ms),
        took = esc(&format!(
            "{}{}",
            if at_least { "at least " } else { "" },
            text::duration_ms(run_ms)
        )),
        version = if run.version.is_empty() {
            String::new()
        } else {
            format!(" · duraflow-rs {}", esc(&run.version))
        },
    );
    for (n, what) in [
        (run.executed, "executed"),
        (run.cached, "cached"),
        (run.failed, "failed"),
    ] {
        let _ = write!(h, r##"<li class="o-{what}"><b>{n}</b> {what}</li>"##);
    }
    if let Some(n) = counts.get("interrupted") {
        let _ = write!(
            h,
            r##"<li class="o-interrupted"><b>{n}</b> interrupted</li>"##
        );
    }
    let _ = write!(
        h,
        r##"</ul>
</header>
<section>
<h2>Timeline <small>{tasks} · {attempts} · {span}</small></h2>
<p class="legend"><i class="o-executed"></i>executed <i class="o-cached"></i>cached <i class="o-failed"></i>failed <i class="o-interrupted"></i>interrupted <i class="o-running"></i>running <span class="hint">— hover a bar for its key, duration, why and error</span></p>
"##,
        tasks = text::count(rows.len() as u64, "task"),
        attempts = text::count(d.attempts.len() as u64, "attempt"),
        span = esc(&text::duration_ms(t1.saturating_sub(t0))),
    );
    if rows.is_empty() {
        h.push_str("<p class=\"empty\">No attempts were recorded for this run.</p>\n");
    } else {
        // The axis and its grid lines.
        let step = tick_step(span);
        let mut ticks = String::new();
        let mut grid = String::new();
        let mut t = 0;
        while t <= span {
            let x = t as f64 * 100.0 / span as f64;
            let _ = write!(
                ticks,
                r##"<span style="left:{x:.3}%">{}</span>"##,
                esc(&text::duration_ms(t))
            );
            let _ = write!(grid, r##"<i style="left:{x:.3}%"></i>"##);
            t += step;
        }
        let _ = write!(
            h,
            r##"<div class="timeline">
<div class="axis"><div class="label"></div><div class="ticks">{ticks}</div></div>
<div class="rows"><div class="grid">{grid}</div>
"##
        );
        for (key, attempts) in &rows {
            let _ = write!(
                h,
                r##"<div class="row"><div class="label" title="{k}">{k}</div><svg class="track" width="100%" height="18" role="img" aria-label="{k}">"##,
                k = esc(key)
            );
            for a in attempts {
                let start = pct(a.started_ms);
                let end = if text::ended(a) {
                    pct(text::attempt_end_ms(a))
                } else {
                    pct(last)
                };
                let width = (end - start).max(MIN_BAR);
                let x = start.min(100.0 - width).max(0.0);
                let outcome = text::outcome(&a.outcome);
                let took = match text::attempt_duration_us(a) {
                    Some(us) => text::duration_us(us),
                    None => format!(
                        "unknown (cut off; at least {})",
                        text::duration_ms(last.saturating_sub(a.started_ms))
                    ),
                };
                let mut tip = format!(
                    "{}\n{outcome}, attempt {}\nstarted +{}\nduration {took}",
                    key,
                    a.attempt,
                    text::duration_ms(a.started_ms.saturating_sub(t0)),
                );
                if let Some(size) = a.output_size {
                    let _ = write!(tip, "\noutput {}", text::bytes(size));
                }
                if let Some(why) = text::why(a) {
                    let _ = write!(tip, "\nwhy: {why}");
                }
                if let Some(error) = text::error(&a.outcome) {
                    let _ = write!(tip, "\nerror: {error}");
                }
                let _ = write!(
                    h,
                    r##"<rect class="bar o-{outcome}" data-key="{k}" data-outcome="{outcome}" data-attempt="{n}" x="{x:.3}%" width="{width:.3}%" y="3" height="12" rx="2"><title>{tip}</title></rect>"##,
                    k = esc(key),
                    n = a.attempt,
                    tip = esc(&tip),
                );
            }
            h.push_str("</svg></div>\n");
        }
        h.push_str("</div>\n</div>\n");
    }
    h.push_str("</section>\n");

    // The table.
    let _ = write!(
        h,
        r##"<section>
<h2>Attempts</h2>
<table>
<thead><tr><th>key</th><th>outcome</th><th class="num">attempt</th><th class="num">started</th><th class="num">duration</th><th class="num">output</th><th>why</th><th>error</th></tr></thead>
<tbody>
"##
    );
    for (key, attempts) in &rows {
        for a in attempts {
            let outcome = text::outcome(&a.outcome);
            let _ = writeln!(
                h,
                r##"<tr><td class="key">{k}</td><td><span class="badge o-{outcome}">{outcome}</span></td><td class="num">{n}</td><td class="num">+{start}</td><td class="num">{took}</td><td class="num">{size}</td><td class="why">{why}</td><td class="error">{error}</td></tr>"##,
                k = esc(key),
                n = a.attempt,
                start = esc(&text::duration_ms(a.started_ms.saturating_sub(t0))),
                took = text::attempt_duration_us(a)
                    .map_or_else(|| "–".to_owned(), |us| esc(&text::duration_us(us))),
                size = a
                    .output_size
                    .map(|s| esc(&text::bytes(s)))
                    .unwrap_or_default(),
                why = text::why(a).map_or_else(|| "–".to_owned(), esc),
                error = text::error(&a.outcome).map(esc).unwrap_or_default(),
            );
        }
    }
    let _ = write!(
        h,
        r##"</tbody>
</table>
</section>
<footer>duraflow {version} · times in UTC</footer>
<div id="rendered" hidden></div>
<script>{SCRIPT}</script>
</body>
</html>
"##,
        version = env!("CARGO_PKG_VERSION"),
    );
    h
}

const CSS: &str = r##"
:root { --executed:#2f9e44; --cached:#74a9cf; --failed:#e03131; --interrupted:#f59f00; --running:#fab005; --label:240px; }
* { box-sizing:border-box; }
body { font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif; color:#1f2328; margin:24px 32px; background:#fff; }
h1 { font-size:22px; margin:0 0 4px; }
h2 { font-size:16px; margin:28px 0 8px; }
h2 small { font-weight:normal; color:#656d76; margin-left:8px; }
code, .key, .label { font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace; font-size:12px; }
.meta { color:#656d76; margin:0 0 12px; }
.counts { list-style:none; padding:0; margin:0; display:flex; gap:10px; }
.counts li { border:1px solid #d0d7de; border-left:4px solid; border-radius:4px; padding:4px 12px; }
.counts li.o-executed { border-left-color:var(--executed); }
.counts li.o-cached { border-left-color:var(--cached); }
.counts li.o-failed { border-left-color:var(--failed); }
.counts li.o-interrupted { border-left-color:var(--interrupted); }
.badge { display:inline-block; border-radius:10px; padding:0 8px; font-size:12px; color:#fff; vertical-align:middle; }
.badge.o-executed, .badge.o-succeeded { background:var(--executed); }
.badge.o-cached { background:var(--cached); }
.badge.o-failed { background:var(--failed); }
.badge.o-interrupted { background:var(--interrupted); }
.badge.o-running { background:var(--running); color:#1f2328; }
.legend { color:#656d76; margin:0 0 8px; }
.legend i { display:inline-block; width:12px; height:12px; border-radius:2px; vertical-align:-1px; margin:0 4px 0 10px; }
.legend i:first-child { margin-left:0; }
.legend i.o-executed { background:var(--executed); } .legend i.o-cached { background:var(--cached); }
.legend i.o-failed { background:var(--failed); } .legend i.o-running { background:var(--running); }
.legend i.o-interrupted { background:repeating-linear-gradient(45deg,#f59f00 0 3px,#ffd8a8 3px 6px); }
.hint { margin-left:10px; }
.timeline { border:1px solid #d0d7de; border-radius:6px; padding:6px 12px 8px; }
.axis, .row { display:flex; align-items:center; }
.label { flex:0 0 var(--label); overflow:hidden; text-overflow:ellipsis; white-space:nowrap; padding-right:10px; }
.ticks { position:relative; flex:1 1 auto; height:20px; color:#656d76; font-size:11px; }
.ticks span { position:absolute; transform:translateX(-50%); white-space:nowrap; }
.ticks span:first-child { transform:none; }
.rows { position:relative; }
.grid { position:absolute; top:0; bottom:0; left:var(--label); right:0; pointer-events:none; }
.grid i { position:absolute; top:0; bottom:0; border-left:1px dashed #eaeef2; }
.row { height:18px; }
.row:hover { background:#f6f8fa; }
.track { flex:1 1 auto; display:block; overflow:visible; position:relative; }
.bar { stroke:rgba(0,0,0,.15); stroke-width:.5; }
.bar:hover { stroke:#1f2328; stroke-width:1.5; }
.bar.o-executed { fill:var(--executed); } .bar.o-cached { fill:var(--cached); }
.bar.o-failed { fill:var(--failed); } .bar.o-interrupted { fill:url(#stripes); }
.bar.o-running { fill:var(--running); }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:3px 10px; border-bottom:1px solid #eaeef2; vertical-align:top; }
th { font-weight:600; color:#656d76; font-size:12px; }
.num { text-align:right; white-space:nowrap; }
td.why { width:25%; white-space:pre-wrap; }
td.error { width:40%; white-space:pre-wrap; color:#b42318; font-family:ui-monospace,"DejaVu Sans Mono",monospace; font-size:12px; }
.empty { color:#656d76; }
footer { margin-top:24px; color:#8c959f; font-size:12px; }
"##;

/// Counts the bars laid out with a size, for tests in a headless browser.
const SCRIPT: &str = r##"
(function () {
  var bars = document.querySelectorAll('svg.track .bar'), shown = 0;
  for (var i = 0; i < bars.length; i++) {
    var r = bars[i].getBoundingClientRect();
    if (r.width > 0 && r.height > 0) shown++;
  }
  var out = document.getElementById('rendered');
  out.setAttribute('data-bars', String(shown));
  out.setAttribute('data-total', String(bars.length));
  out.setAttribute('data-rows', String(document.querySelectorAll('.rows .row').length));
})();
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_controls() {
        assert_eq!(
            esc(r##"<script>"a" & 'b'</script>"##),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
        assert_eq!(esc("a\0b\nc"), "a\\u{0}b\nc");
    }

    #[test]
    fn ticks_are_few_and_round() {
        assert_eq!(tick_step(1), 1);
        assert_eq!(tick_step(9), 2);
        assert_eq!(tick_step(1000), 200);
        assert_eq!(tick_step(3_600_000), 500_000);
    }
}
