//! An SVG picture of a run: throughput over time (top), latency percentiles over time on a log
//! scale, and, when the run had errors, errors per second by kind (bottom; not-found reads are
//! not errors and are left out). Hand-written SVG: no plotting dependency.

use std::fmt::Write;

use crate::report::Point;
use crate::target::ErrorKind;

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 300.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 150.0;
const MARGIN_TOP: f64 = 40.0;
const GAP: f64 = 60.0;
/// Below the last panel: the axis label.
const MARGIN_BOTTOM: f64 = 50.0;
/// Line colours of the error kinds, in [`ErrorKind::ALL`] order.
const ERROR_COLORS: [&str; ErrorKind::ALL.len()] =
    ["#7f7f7f", "#8c564b", "#ff7f0e", "#9467bd", "#e377c2", "#bcbd22", "#17becf", "#2ca02c", "#d62728", "#1f77b4"];

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    values: Vec<(f64, f64)>,
}

/// The error kinds drawn: those with any error in the run, not-found aside.
fn error_series(points: &[Point]) -> Vec<Series<'static>> {
    ErrorKind::ALL
        .iter()
        .filter(|k| **k != ErrorKind::NotFound && points.iter().any(|p| p.errors_per_s[k.index()] > 0.0))
        .map(|k| Series {
            name: k.name(),
            color: ERROR_COLORS.get(k.index()).copied().unwrap_or("#000000"),
            values: points.iter().map(|p| (p.t, p.errors_per_s[k.index()])).collect(),
        })
        .collect()
}

/// Renders the points as an SVG document.
pub fn render(title: &str, points: &[Point]) -> String {
    let t_max = points.iter().map(|p| p.t).fold(1.0, f64::max);
    let errors = error_series(points);
    let panels = if errors.is_empty() { 2.0 } else { 3.0 };
    let mut svg = String::new();
    let height = MARGIN_TOP + panels * PANEL_HEIGHT + (panels - 1.0) * GAP + MARGIN_BOTTOM;
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(svg, r#"<text x="{MARGIN_LEFT}" y="24" font-size="16">{}</text>"#, escape(title));
    let throughput = [
        Series { name: "reads/s", color: "#1f77b4", values: points.iter().map(|p| (p.t, p.reads_per_s)).collect() },
        Series { name: "writes/s", color: "#d62728", values: points.iter().map(|p| (p.t, p.writes_per_s)).collect() },
    ];
    panel(&mut svg, MARGIN_TOP, "operations per second", t_max, &throughput, false);
    let pick = |f: fn(&Point) -> u64| points.iter().map(|p| (p.t, f(p) as f64)).filter(|(_, v)| *v > 0.0).collect();
    let latency = [
        Series { name: "read p50", color: "#1f77b4", values: pick(|p| p.read_us[0]) },
        Series { name: "read p99", color: "#6baed6", values: pick(|p| p.read_us[1]) },
        Series { name: "read p99.9", color: "#c6dbef", values: pick(|p| p.read_us[2]) },
        Series { name: "write p50", color: "#d62728", values: pick(|p| p.write_us[0]) },
        Series { name: "write p99", color: "#fc9272", values: pick(|p| p.write_us[1]) },
        Series { name: "write p99.9", color: "#fcbba1", values: pick(|p| p.write_us[2]) },
    ];
    panel(&mut svg, MARGIN_TOP + PANEL_HEIGHT + GAP, "latency (µs, log scale)", t_max, &latency, true);
    if !errors.is_empty() {
        panel(&mut svg, MARGIN_TOP + 2.0 * (PANEL_HEIGHT + GAP), "errors per second", t_max, &errors, false);
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">seconds</text>"#,
        MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) / 2.0,
        height - 10.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, top: f64, label: &str, t_max: f64, series: &[Series<'_>], log: bool) {
    let w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let h = PANEL_HEIGHT;
    let all: Vec<f64> = series.iter().flat_map(|s| s.values.iter().map(|v| v.1)).collect();
    let y_max = all.iter().copied().fold(1.0, f64::max) * 1.1;
    // Log scale: at least a decade tall, bottom at the smallest value (but not below 1 µs).
    let y_max = if log { y_max.max(10.0) } else { y_max };
    let y_min = if log { all.iter().copied().fold(f64::MAX, f64::min).clamp(1.0, y_max / 10.0) } else { 0.0 };
    let scale_y = |v: f64| {
        if log {
            top + h - (v.max(y_min).ln() - y_min.ln()) / (y_max.ln() - y_min.ln()) * h
        } else {
            top + h - v / y_max * h
        }
    };
    let scale_x = |t: f64| MARGIN_LEFT + t / t_max * w;
    let _ =
        writeln!(svg, r##"<rect x="{MARGIN_LEFT}" y="{top}" width="{w}" height="{h}" fill="none" stroke="#888"/>"##);
    let _ = writeln!(
        svg,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>"#,
        top + h / 2.0,
        top + h / 2.0,
        escape(label)
    );
    for i in 0..=4 {
        let frac = f64::from(i) / 4.0;
        let v = if log { (y_min.ln() + frac * (y_max.ln() - y_min.ln())).exp() } else { frac * y_max };
        let y = scale_y(v);
        let _ = writeln!(
            svg,
            r##"<line x1="{MARGIN_LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/>"##,
            MARGIN_LEFT + w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            MARGIN_LEFT - 6.0,
            y + 4.0,
            human(v)
        );
        let t = frac * t_max;
        let _ =
            writeln!(svg, r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.0}</text>"#, scale_x(t), top + h + 16.0);
    }
    for (i, s) in series.iter().enumerate() {
        if s.values.is_empty() {
            continue;
        }
        let pts: Vec<String> = s.values.iter().map(|(t, v)| format!("{:.1},{:.1}", scale_x(*t), scale_y(*v))).collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            s.color,
            pts.join(" ")
        );
        let ly = top + 16.0 + 18.0 * i as f64;
        let lx = MARGIN_LEFT + w + 12.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="3"/>"#,
            lx + 20.0,
            s.color
        );
        let _ = writeln!(svg, r#"<text x="{}" y="{}">{}</text>"#, lx + 26.0, ly + 4.0, escape(s.name));
    }
}

fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_well_formed_svg() {
        let points: Vec<Point> = (1..=5)
            .map(|i| Point {
                t: f64::from(i),
                reads_per_s: 1000.0 * f64::from(i),
                writes_per_s: 500.0,
                read_us: [100, 900, 2000],
                write_us: [50, 400, 800],
                ..Point::default()
            })
            .collect();
        let svg = render("RU,80 <test>", &points);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 8);
        assert!(svg.contains("&lt;test&gt;"));
    }

    #[test]
    fn renders_write_only_runs_with_microsecond_latencies() {
        // Appends into RAM: every percentile 1-2 µs, and no reads at all.
        let points: Vec<Point> = (1..=3)
            .map(|i| Point {
                t: f64::from(i),
                reads_per_s: 0.0,
                writes_per_s: 300_000.0,
                read_us: [0, 0, 0],
                write_us: [1, 2, 2],
                ..Point::default()
            })
            .collect();
        let svg = render("RR,0", &points);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert_eq!(svg.matches("<polyline").count(), 2 + 3, "both throughputs and the three write percentiles");
    }

    #[test]
    fn renders_errors_per_second_when_there_were_errors() {
        let points: Vec<Point> = (1..=6)
            .map(|i| {
                let mut p =
                    Point { t: f64::from(i), reads_per_s: 1000.0, read_us: [100, 200, 300], ..Point::default() };
                // A node down in seconds 3 and 4; not-found reads all along are not errors.
                p.errors_per_s[ErrorKind::NotFound.index()] = 10.0;
                if (3..=4).contains(&i) {
                    p.errors_per_s[ErrorKind::Unavailable.index()] = 800.0;
                    p.errors_per_s[ErrorKind::Io.index()] = 3.0;
                }
                p
            })
            .collect();
        let svg = render("RU,80", &points);
        assert!(svg.contains("errors per second") && svg.contains(">unavailable<") && svg.contains(">io<"));
        assert!(!svg.contains(">not_found<"));
        assert_eq!(svg.matches("<polyline").count(), 2 + 3 + 2, "throughput, read percentiles, two error kinds");
        assert!(svg.contains(r#"height="1110""#), "three panels tall");
        // Without errors the picture is the two panels as before.
        let quiet: Vec<Point> =
            points.iter().map(|p| Point { errors_per_s: Default::default(), ..p.clone() }).collect();
        assert!(!render("RU,80", &quiet).contains("errors per second"));
    }
}
