//! `report.html`: one self-contained page (no network, no scripts) with the metric tables, a
//! plot of VISOR over rounds per split and method, and image grids per round with the
//! relabeled prompts under the images. Images are embedded as PNG data URIs.

use crate::metrics_file::{EvalSplit, MetricsRow};
use std::fmt::Write;

/// One image of a round's gallery.
pub struct GalleryItem {
    pub png: Vec<u8>,
    pub original_prompt: String,
    /// The prompt trained on (equal to the original when the image was right).
    pub prompt: String,
    /// "correct", "location" or "count"; "dropped" when the pair was not trained on.
    pub reason: String,
}

pub struct RoundGallery {
    pub title: String,
    pub items: Vec<GalleryItem>,
}

pub struct ReportData<'a> {
    pub title: &'a str,
    pub config_toml: &'a str,
    pub rows: &'a [MetricsRow],
    pub galleries: &'a [RoundGallery],
    /// Free text (e.g. the terminal summary) shown under the title.
    pub notes: &'a str,
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

pub fn render_report(d: &ReportData) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title>\n<style>{STYLE}</style></head><body>\n<h1>{t}</h1>\n",
        t = esc(d.title)
    );
    if !d.notes.is_empty() {
        let _ = writeln!(h, "<pre class=\"notes\">{}</pre>", esc(d.notes));
    }
    h.push_str("<h2>VISOR over rounds</h2>\n");
    h.push_str(&plot(d.rows));
    for split in EvalSplit::ALL {
        let rows: Vec<&MetricsRow> = d.rows.iter().filter(|r| r.split == split).collect();
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(h, "<h2>Metrics: {} prompts</h2>", split.name());
        h.push_str(&table(&rows));
    }
    for g in d.galleries {
        let _ = writeln!(h, "<h2>{}</h2>\n<div class=\"grid\">", esc(&g.title));
        for it in &g.items {
            let changed = it.prompt != it.original_prompt;
            let _ = writeln!(
                h,
                "<figure class=\"{cls}\"><img alt=\"{alt}\" src=\"data:image/png;base64,{img}\"><figcaption><span class=\"orig\">{orig}</span>{new}<span class=\"reason\">{reason}</span></figcaption></figure>",
                cls = esc(&it.reason),
                alt = esc(&it.original_prompt),
                img = base64(&it.png),
                orig = esc(&it.original_prompt),
                new = if changed { format!("<span class=\"new\">&rarr; {}</span>", esc(&it.prompt)) } else { String::new() },
                reason = esc(&it.reason),
            );
        }
        h.push_str("</div>\n");
    }
    let _ = write!(h, "<h2>Configuration</h2>\n<pre>{}</pre>\n</body></html>\n", esc(d.config_toml));
    h
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}\
th{background:#f3f3f3}td.l,th.l{text-align:left}\
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:136px;font-size:11px}\
figure img{width:128px;height:128px;image-rendering:pixelated;border:4px solid #999}\
figure.correct img{border-color:#2ca02c}figure.location img{border-color:#ff7f0e}\
figure.count img{border-color:#d62728}figure.dropped img{border-color:#777}\
figcaption span{display:block}.new{color:#b35900}.reason{color:#777}pre{background:#f6f6f6;padding:1em;overflow:auto}";

fn table(rows: &[&MetricsRow]) -> String {
    let clip = rows.iter().any(|r| r.clip_score.is_some());
    let mut h = String::from(
        "<table><tr><th class=\"l\">method</th><th>round</th><th>OA</th><th>VISOR_uncond</th><th>VISOR_cond</th><th>VISOR_1</th><th>VISOR_2</th><th>VISOR_3</th><th>VISOR_4</th><th>IPR strict</th>",
    );
    h.push_str(if clip { "<th>CLIP score</th></tr>\n" } else { "</tr>\n" });
    for r in rows {
        let _ = write!(
            h,
            "<tr><td class=\"l\">{}</td><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td>",
            esc(&r.method), r.iteration, r.oa, r.visor_uncond, r.visor_cond, r.visor_1, r.visor_2, r.visor_3, r.visor_4, r.ipr_strict
        );
        if clip {
            let _ = write!(h, "<td>{}</td>", r.clip_score.map(|c| format!("{c:.2}")).unwrap_or_default());
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    h
}

/// An SVG line plot of VISOR_uncond per iteration: one line per (method, split); held-out
/// dashed. Methods other than the base start from the base model's point at iteration 0.
fn plot(rows: &[MetricsRow]) -> String {
    let (w, hgt, pad) = (640.0, 320.0, 48.0);
    let max_iter = rows.iter().map(|r| r.iteration).max().unwrap_or(0).max(1) as f64;
    let x = |i: f64| pad + (w - 2.0 * pad) * i / max_iter;
    let y = |v: f64| hgt - pad - (hgt - 2.0 * pad) * v / 100.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\" role=\"img\" aria-label=\"VISOR_uncond over rounds\">\n"
    );
    for v in [0.0, 25.0, 50.0, 75.0, 100.0] {
        let (x1, y0, xl) = (w - pad, y(v), pad - 6.0);
        let _ = writeln!(
            s,
            "<line x1=\"{pad}\" x2=\"{x1}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#ddd\"/><text x=\"{xl}\" y=\"{y0}\" font-size=\"11\" text-anchor=\"end\">{v}</text>"
        );
    }
    for i in 0..=max_iter as u32 {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{i}</text>",
            x(i as f64),
            hgt - pad + 16.0
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">round (0 = base model); y: VISOR_uncond</text>",
        w / 2.0,
        hgt - 8.0
    );
    let mut methods: Vec<&str> = rows.iter().map(|r| r.method.as_str()).filter(|m| *m != "base").collect();
    methods.dedup();
    methods.sort();
    methods.dedup();
    let mut legend_y = pad;
    for (mi, method) in methods.iter().enumerate() {
        for split in EvalSplit::ALL {
            let mut pts: Vec<(u32, f64)> = rows
                .iter()
                .filter(|r| r.split == split && (r.method == *method || (r.method == "base" && r.iteration == 0)))
                .map(|r| (r.iteration, r.visor_uncond))
                .collect();
            pts.sort_by_key(|p| p.0);
            pts.dedup_by_key(|p| p.0);
            if pts.is_empty() {
                continue;
            }
            let color = COLORS[mi % COLORS.len()];
            let dash = match split {
                EvalSplit::Seen => "",
                EvalSplit::Validation => " stroke-dasharray=\"2 3\"",
                EvalSplit::Heldout => " stroke-dasharray=\"6 4\"",
            };
            let path: Vec<String> = pts.iter().map(|&(i, v)| format!("{:.1},{:.1}", x(i as f64), y(v))).collect();
            let _ = writeln!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                path.join(" ")
            );
            for &(i, v) in &pts {
                let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>", x(i as f64), y(v));
            }
            let _ = writeln!(
                s,
                "<line x1=\"{}\" x2=\"{}\" y1=\"{legend_y}\" y2=\"{legend_y}\" stroke=\"{color}\" stroke-width=\"2\"{dash}/><text x=\"{}\" y=\"{}\" font-size=\"11\">{} {}</text>",
                w - pad - 110.0,
                w - pad - 90.0,
                w - pad - 85.0,
                legend_y + 4.0,
                esc(method),
                split.name()
            );
            legend_y += 14.0;
        }
    }
    s.push_str("</svg>\n");
    s
}

/// HTML-escape text for element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648), for data URIs.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn report_is_self_contained_and_escaped() {
        let row = |method: &str, iteration, split, v| MetricsRow {
            iteration,
            split,
            oa: 90.0,
            visor_uncond: v,
            visor_cond: v,
            visor_1: v,
            visor_2: v,
            visor_3: v,
            visor_4: v,
            ipr_strict: v,
            method: method.into(),
            clip_score: None,
        };
        let rows = [
            row("base", 0, EvalSplit::Seen, 30.0),
            row("base", 0, EvalSplit::Heldout, 28.0),
            row("ipr", 1, EvalSplit::Seen, 45.0),
            row("ipr", 1, EvalSplit::Heldout, 44.0),
        ];
        let galleries = [RoundGallery {
            title: "Round 1 <labelled>".into(),
            items: vec![GalleryItem {
                png: vec![0x89, b'P', b'N', b'G'],
                original_prompt: "a cat to the left of a dog".into(),
                prompt: "a cat above a dog".into(),
                reason: "location".into(),
            }],
        }];
        let html = render_report(&ReportData {
            title: "run <toy>",
            config_toml: "name = \"toy\"",
            rows: &rows,
            galleries: &galleries,
            notes: "",
        });
        assert!(html.contains("<title>run &lt;toy&gt;</title>"));
        assert!(html.contains("Round 1 &lt;labelled&gt;"));
        assert!(html.contains("data:image/png;base64,iVBORw=="));
        assert!(html.contains("&rarr; a cat above a dog"));
        assert!(html.contains("<polyline") && html.contains("stroke-dasharray"));
        assert!(html.contains("<td>45.00</td>"));
        // Nothing is fetched: the only URL is the SVG namespace.
        assert_eq!(html.matches("http").count(), 1);
        assert!(!html.contains("<script"));
    }
}
