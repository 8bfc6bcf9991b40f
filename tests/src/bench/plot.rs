//! A small SVG line-chart renderer for the benchmark plots in docs/.
//!
//! [`render`] draws a [`Chart`]: a title, a plot area with a linear or logarithmic scale on
//! each axis (tick marks, light gray grid lines, tick labels, axis labels), one polyline with a
//! circle at each point per [`Series`] (dashed on request, colors from the Okabe-Ito
//! colorblind-friendly palette), and a legend to the right of the plot area, outside it, so it
//! never hides data. The canvas is 720×440; the plot area narrows for a wide legend, down to a
//! minimum width, after which the canvas widens (and it grows taller for a tall legend).
//!
//! - Log axes have ticks at the powers of ten (labels `0.01`, `0.1`, `1`, `10`, …, `1k`, `1M`,
//!   …), from the power at or below the smallest value to the one at or above the largest.
//! - Linear axes have "nice" ticks (steps of 1, 2 or 5 × 10^k, about six intervals) and start
//!   at 0 when no value is negative (end at 0 when none is positive); labels are compact
//!   (`0.5`, `12`, `200k`, `1.5M`).
//!
//! It is hand-written because no plotting crate builds on this toolchain without extra
//! (system) dependencies, and because its output is deterministic: the same chart gives the
//! same bytes (coordinates rounded to one decimal, no floating-point noise), so a regenerated
//! plot diffs only where the data changed. It never panics: invalid data gives a
//! [`PlotError`], and degenerate data (one point, all-equal values) gets a nonzero range.

use std::fmt::{self, Write as _};

/// One line of a [`Chart`].
#[derive(Debug, Clone)]
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// `(x, y)` data points, in any order: they are drawn sorted by x.
    pub points: Vec<(f64, f64)>,
    /// Draw the line dashed (and the markers hollow).
    pub dashed: bool,
    /// Palette index (cycling after eight); `None`: the series' position. Series of one
    /// system measured two ways share a color and differ in `dashed`.
    pub color: Option<usize>,
}

/// A line chart: see the module docs.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Drawn above the plot area (nothing if empty; likewise the axis labels).
    pub title: String,
    /// Below the x axis.
    pub x_label: String,
    /// Left of the y axis, rotated.
    pub y_label: String,
    /// Logarithmic x axis (every x must then be > 0).
    pub log_x: bool,
    /// Logarithmic y axis (every y must then be > 0).
    pub log_y: bool,
    /// Drawn in order, each in the next palette color (cycling after eight).
    pub series: Vec<Series>,
}

/// Why a [`Chart`] cannot be drawn.
#[derive(Debug, Clone, PartialEq)]
pub enum PlotError {
    /// No series has any point.
    NoPoints,
    /// A value on a logarithmic axis is zero or negative.
    NonPositiveOnLogAxis { series: String, value: f64 },
    /// A value is NaN or infinite.
    NotFinite { series: String },
}

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlotError::NoPoints => write!(f, "the chart has no data points"),
            PlotError::NonPositiveOnLogAxis { series, value } => write!(
                f,
                "series {series:?} has the value {value} on a logarithmic axis (must be > 0)"
            ),
            PlotError::NotFinite { series } => {
                write!(f, "series {series:?} has a NaN or infinite value")
            }
        }
    }
}

impl std::error::Error for PlotError {}

/// Okabe-Ito, ordered for contrast on white (yellow last).
const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 440.0;
const MARGIN_TOP: f64 = 44.0;
const MARGIN_BOTTOM: f64 = 56.0;
const MARGIN_RIGHT: f64 = 12.0;
/// Room left of the y tick labels for the rotated y axis label.
const Y_LABEL_ROOM: f64 = 34.0;
const MIN_MARGIN_LEFT: f64 = 64.0;
const MIN_PLOT_WIDTH: f64 = 400.0;
const LEGEND_GAP: f64 = 16.0;
const LEGEND_ROW: f64 = 20.0;
const LEGEND_SAMPLE: f64 = 24.0;
/// A generous average advance of a 12px sans-serif character, to size boxes around text.
const CHAR_WIDTH: f64 = 7.0;
const TICK_LEN: f64 = 5.0;
const MARKER_RADIUS: f64 = 3.0;
/// At most this many intervals between linear ticks (so 5 to 9 ticks).
const MAX_INTERVALS: f64 = 8.0;
/// More ticks than this on an axis (only for extreme data) fall back to plain end ticks.
const MAX_TICKS: f64 = 100.0;
/// At most this many labelled powers of ten on a log axis; the others keep grid lines.
const MAX_LOG_LABELS: f64 = 10.0;

/// Renders `chart` as a standalone SVG document.
pub fn render(chart: &Chart) -> Result<String, PlotError> {
    let mut series: Vec<(&Series, Vec<(f64, f64)>)> = Vec::with_capacity(chart.series.len());
    for s in &chart.series {
        for &(x, y) in &s.points {
            if !x.is_finite() || !y.is_finite() {
                return Err(PlotError::NotFinite {
                    series: s.name.clone(),
                });
            }
            for (log, value) in [(chart.log_x, x), (chart.log_y, y)] {
                if log && value <= 0.0 {
                    return Err(PlotError::NonPositiveOnLogAxis {
                        series: s.name.clone(),
                        value,
                    });
                }
            }
        }
        let mut points = s.points.clone();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        series.push((s, points));
    }
    let all = || series.iter().flat_map(|(_, p)| p.iter());
    if all().next().is_none() {
        return Err(PlotError::NoPoints);
    }
    let x_axis = Axis::new(all().map(|p| p.0), chart.log_x);
    let y_axis = Axis::new(all().map(|p| p.1), chart.log_y);

    // Layout.
    let y_label_width = y_axis
        .ticks
        .iter()
        .filter_map(|t| t.label.as_deref())
        .map(text_width)
        .fold(0.0, f64::max);
    let left = (Y_LABEL_ROOM + y_label_width + TICK_LEN + 4.0).max(MIN_MARGIN_LEFT);
    let legend_text = series
        .iter()
        .map(|(s, _)| text_width(&s.name))
        .fold(0.0, f64::max);
    let legend_w = 10.0 + LEGEND_SAMPLE + 8.0 + legend_text + 10.0;
    let legend_h = 8.0 + LEGEND_ROW * series.len() as f64;
    let plot_w = (WIDTH - left - LEGEND_GAP - legend_w - MARGIN_RIGHT).max(MIN_PLOT_WIDTH);
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let width = left + plot_w + LEGEND_GAP + legend_w + MARGIN_RIGHT;
    let height = HEIGHT.max(MARGIN_TOP + legend_h + MARGIN_RIGHT);
    let (top, bottom, right) = (MARGIN_TOP, MARGIN_TOP + plot_h, left + plot_w);
    let px = |x: f64| left + x_axis.frac(x) * plot_w;
    let py = |y: f64| bottom - y_axis.frac(y) * plot_h;

    let mut svg = String::new();
    let w = &mut svg;
    line(
        w,
        format_args!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{wd}" height="{ht}" viewBox="0 0 {wd} {ht}" font-family="sans-serif" font-size="12">"#,
            wd = c(width),
            ht = c(height)
        ),
    );
    line(
        w,
        format_args!(r#"<rect width="100%" height="100%" fill="white"/>"#),
    );
    if !chart.title.is_empty() {
        line(
            w,
            format_args!(
                r#"<text x="{}" y="26" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"#,
                c(left + plot_w / 2.0),
                escape(&chart.title)
            ),
        );
    }

    // Grid lines first, so ticks, axes and data draw over them.
    line(w, format_args!(r#"<g stroke-width="1">"#));
    for t in &x_axis.ticks {
        let x = c(left + t.frac * plot_w);
        let stroke = if t.major { "#dddddd" } else { "#f0f0f0" };
        line(
            w,
            format_args!(
                r#"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="{stroke}"/>"#,
                c(top),
                c(bottom)
            ),
        );
    }
    for t in &y_axis.ticks {
        let y = c(bottom - t.frac * plot_h);
        let stroke = if t.major { "#dddddd" } else { "#f0f0f0" };
        line(
            w,
            format_args!(
                r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{stroke}"/>"#,
                c(left),
                c(right)
            ),
        );
    }
    line(w, format_args!("</g>"));

    // Frame, tick marks and tick labels.
    line(
        w,
        format_args!(
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#333333"/>"##,
            c(left),
            c(top),
            c(plot_w),
            c(plot_h)
        ),
    );
    line(w, format_args!(r##"<g stroke="#333333">"##));
    for t in &x_axis.ticks {
        let x = c(left + t.frac * plot_w);
        let len = if t.major { TICK_LEN } else { TICK_LEN / 2.0 };
        line(
            w,
            format_args!(
                r#"<line x1="{x}" y1="{}" x2="{x}" y2="{}"/>"#,
                c(bottom),
                c(bottom + len)
            ),
        );
    }
    for t in &y_axis.ticks {
        let y = c(bottom - t.frac * plot_h);
        let len = if t.major { TICK_LEN } else { TICK_LEN / 2.0 };
        line(
            w,
            format_args!(
                r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}"/>"#,
                c(left - len),
                c(left)
            ),
        );
    }
    line(w, format_args!("</g>"));
    line(w, format_args!(r##"<g fill="#333333">"##));
    for t in &x_axis.ticks {
        if let Some(label) = &t.label {
            line(
                w,
                format_args!(
                    r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                    c(left + t.frac * plot_w),
                    c(bottom + TICK_LEN + 14.0),
                    escape(label)
                ),
            );
        }
    }
    for t in &y_axis.ticks {
        if let Some(label) = &t.label {
            line(
                w,
                format_args!(
                    r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                    c(left - TICK_LEN - 4.0),
                    c(bottom - t.frac * plot_h + 4.0),
                    escape(label)
                ),
            );
        }
    }
    line(w, format_args!("</g>"));

    // Axis labels.
    if !chart.x_label.is_empty() {
        line(
            w,
            format_args!(
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                c(left + plot_w / 2.0),
                c(bottom + 42.0),
                escape(&chart.x_label)
            ),
        );
    }
    if !chart.y_label.is_empty() {
        let (ylx, yly) = (c(16.0), c(top + plot_h / 2.0));
        line(
            w,
            format_args!(
                r#"<text x="{ylx}" y="{yly}" text-anchor="middle" transform="rotate(-90 {ylx} {yly})">{}</text>"#,
                escape(&chart.y_label)
            ),
        );
    }

    // Data.
    for (i, (s, points)) in series.iter().enumerate() {
        let color = PALETTE[s.color.unwrap_or(i) % PALETTE.len()];
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        line(w, format_args!("<g>"));
        if points.len() >= 2 {
            let mut coords = String::new();
            for (j, &(x, y)) in points.iter().enumerate() {
                let sep = if j == 0 { "" } else { " " };
                let _ = write!(coords, "{sep}{},{}", c(px(x)), c(py(y)));
            }
            line(
                w,
                format_args!(
                    r#"<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2" stroke-linejoin="round"{dash}/>"#
                ),
            );
        }
        for &(x, y) in points {
            marker(w, px(x), py(y), color, s.dashed);
        }
        line(w, format_args!("</g>"));
    }

    // Legend.
    let lx = right + LEGEND_GAP;
    line(
        w,
        format_args!(
            r##"<rect x="{}" y="{}" width="{}" height="{}" fill="white" stroke="#999999"/>"##,
            c(lx),
            c(top),
            c(legend_w),
            c(legend_h)
        ),
    );
    for (i, (s, _)) in series.iter().enumerate() {
        let color = PALETTE[s.color.unwrap_or(i) % PALETTE.len()];
        let y = top + 4.0 + LEGEND_ROW * (i as f64 + 0.5);
        let (x1, x2) = (lx + 10.0, lx + 10.0 + LEGEND_SAMPLE);
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        line(
            w,
            format_args!(
                r#"<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>"#,
                c(x1),
                c(x2),
                y = c(y)
            ),
        );
        marker(w, (x1 + x2) / 2.0, y, color, s.dashed);
        line(
            w,
            format_args!(
                r#"<text x="{}" y="{}">{}</text>"#,
                c(x2 + 8.0),
                c(y + 4.0),
                escape(&s.name)
            ),
        );
    }
    line(w, format_args!("</svg>"));
    Ok(svg)
}

/// A circle at a data point: filled, or hollow for a dashed series.
fn marker(w: &mut String, x: f64, y: f64, color: &str, hollow: bool) {
    let fill = if hollow { "white" } else { color };
    line(
        w,
        format_args!(
            r#"<circle cx="{}" cy="{}" r="{}" fill="{fill}" stroke="{color}" stroke-width="1.5"/>"#,
            c(x),
            c(y),
            c(MARKER_RADIUS)
        ),
    );
}

fn line(w: &mut String, args: fmt::Arguments<'_>) {
    // Writing to a String cannot fail.
    let _ = w.write_fmt(args);
    w.push('\n');
}

/// The estimated width of `s` in the 12px font.
fn text_width(s: &str) -> f64 {
    s.chars().count() as f64 * CHAR_WIDTH
}

/// A coordinate, rounded to one decimal, without a trailing `.0` or a negative zero.
fn c(v: f64) -> String {
    let tenths = (v * 10.0).round();
    if !tenths.is_finite() || tenths == 0.0 {
        "0".to_string()
    } else if tenths % 10.0 == 0.0 {
        format!("{}", tenths / 10.0)
    } else {
        format!("{:.1}", tenths / 10.0)
    }
}

/// Escapes text for XML content and attribute values, dropping the control characters XML
/// 1.0 cannot represent.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

struct Tick {
    /// Position along the axis, 0 at its start and 1 at its end.
    frac: f64,
    /// None for minor ticks and for thinned-out log labels.
    label: Option<String>,
    /// Major ticks get a darker grid line and a full-length tick mark.
    major: bool,
}

/// The scale of one axis: linear over `[lo, hi]`, or logarithmic over `[10^lo, 10^hi]`.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<Tick>,
}

impl Axis {
    /// An axis covering `values` (finite, non-empty, > 0 if `log`).
    fn new(values: impl Iterator<Item = f64> + Clone, log: bool) -> Axis {
        let min = values.clone().fold(f64::INFINITY, f64::min);
        let max = values.fold(f64::NEG_INFINITY, f64::max);
        if log {
            Axis::log(min, max)
        } else {
            Axis::linear(min, max)
        }
    }

    fn log(min: f64, max: f64) -> Axis {
        let mut lo = log10(min).floor();
        let mut hi = log10(max).ceil();
        if lo >= hi {
            lo -= 1.0;
            hi += 1.0;
        }
        let mut axis = Axis {
            log: true,
            lo,
            hi,
            ticks: Vec::new(),
        };
        // Powers of ten span at most ~650 decades for finite positive f64s.
        let decades = hi - lo;
        let every = (decades / MAX_LOG_LABELS).ceil().max(1.0);
        let minor = decades <= 6.0;
        let mut e = lo;
        while e <= hi {
            let labelled = (e - lo) % every == 0.0;
            axis.ticks.push(Tick {
                frac: (e - lo) / decades,
                label: labelled.then(|| power_label(e)),
                major: true,
            });
            if minor && e < hi {
                for m in 2..=9 {
                    axis.ticks.push(Tick {
                        frac: (e + f64::from(m).log10() - lo) / decades,
                        label: None,
                        major: false,
                    });
                }
            }
            e += 1.0;
        }
        axis
    }

    fn linear(mut min: f64, mut max: f64) -> Axis {
        if min >= 0.0 {
            min = 0.0;
        } else if max <= 0.0 {
            max = 0.0;
        }
        if min >= max {
            // All values equal (and the range then ends at 0: this one is 0 too).
            max = min + 1.0;
        }
        // Halves keep the span finite for any finite min and max.
        let half_span = max * 0.5 - min * 0.5;
        let mut step = nice_step(half_span / (MAX_INTERVALS / 2.0));
        let mut k_lo = (min / step).floor();
        let mut k_hi = (max / step).ceil();
        // Rounding the ends out to whole steps can add an interval: then take the next step.
        if k_hi - k_lo > MAX_INTERVALS {
            step = next_step(step);
            k_lo = (min / step).floor();
            k_hi = (max / step).ceil();
        }
        let (lo, hi) = (k_lo * step, k_hi * step);
        if step > 0.0 && lo.is_finite() && hi.is_finite() && k_hi > k_lo && k_hi - k_lo <= MAX_TICKS
        {
            let ticks = (0..=(k_hi - k_lo) as u32)
                .map(|i| {
                    let k = k_lo + f64::from(i);
                    Tick {
                        frac: f64::from(i) / (k_hi - k_lo),
                        label: Some(number_label(k * step, step)),
                        major: true,
                    }
                })
                .collect();
            return Axis {
                log: false,
                lo,
                hi,
                ticks,
            };
        }
        // Extreme data (a span near f64::MAX, or below the smallest normal step): ticks at
        // the ends and the middle.
        let mid = min * 0.5 + max * 0.5;
        let ticks = [(0.0, min), (0.5, mid), (1.0, max)]
            .into_iter()
            .map(|(frac, v)| Tick {
                frac,
                label: Some(number_label(v, half_span / 10.0)),
                major: true,
            })
            .collect();
        Axis {
            log: false,
            lo: min,
            hi: max,
            ticks,
        }
    }

    /// Where `v` lies on the axis, 0 at its start and 1 at its end.
    fn frac(&self, v: f64) -> f64 {
        let f = if self.log {
            (log10(v) - self.lo) / (self.hi - self.lo)
        } else {
            (v * 0.5 - self.lo * 0.5) / (self.hi * 0.5 - self.lo * 0.5)
        };
        if f.is_finite() {
            f
        } else {
            0.0
        }
    }
}

/// log10, exact for powers of ten (up to rounding of the input).
fn log10(v: f64) -> f64 {
    let e = v.log10();
    if (e - e.round()).abs() < 1e-9 {
        e.round()
    } else {
        e
    }
}

/// The 1, 2 or 5 × 10^k at or above `raw`.
fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(log10(raw).floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

/// The nice step after `step`: 1 → 2 → 5 → 10 (× 10^k).
fn next_step(step: f64) -> f64 {
    let mag = 10f64.powf(log10(step).floor());
    let m = (step / mag).round();
    if m < 2.0 {
        2.0 * mag
    } else if m < 5.0 {
        5.0 * mag
    } else {
        10.0 * mag
    }
}

/// The label of 10^e: `1`, `10`, `1k`, `0.01`, …, and `1e15` beyond the suffixes.
fn power_label(e: f64) -> String {
    if (-3.0..15.0).contains(&e) {
        number_label(10f64.powf(e), 10f64.powf(e))
    } else {
        format!("1e{e}")
    }
}

/// `v` compactly, to the resolution `res` (the tick step): `0.5`, `12`, `200k`, `1.5M`.
fn number_label(v: f64, res: f64) -> String {
    let res = if res.is_finite() && res > 0.0 {
        res
    } else {
        v.abs()
    };
    if v == 0.0 || v.abs() < res * 1e-9 {
        return "0".to_string();
    }
    let abs = v.abs();
    if !(1e-4..1e15).contains(&abs) || res < 1e-4 {
        // Scientific, with as many digits as the resolution needs.
        let digits = (log10(abs).floor() - log10(res).floor()).clamp(0.0, 6.0) as usize;
        let s = format!("{v:.digits$e}");
        return match s.split_once('e') {
            Some((mantissa, exp)) => format!("{}e{exp}", trim_zeros(mantissa)),
            None => s,
        };
    }
    // A suffix only where the resolution is coarse enough for it to read well.
    let (scale, suffix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(scale, _)| abs >= scale && res >= scale / 1000.0)
        .unwrap_or((1.0, ""));
    let decimals = (-log10(res / scale).floor()).clamp(0.0, 12.0) as usize;
    format!(
        "{}{suffix}",
        trim_zeros(&format!("{:.decimals$}", v / scale))
    )
}

/// `1.50` → `1.5`, `2.0` → `2`, `120` → `120`.
fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, points: &[(f64, f64)], dashed: bool) -> Series {
        Series {
            name: name.to_string(),
            points: points.to_vec(),
            dashed,
            color: None,
        }
    }

    fn chart(log_x: bool, log_y: bool, series: Vec<Series>) -> Chart {
        Chart {
            title: "ns/packet".to_string(),
            x_label: "endpoints".to_string(),
            y_label: "ns".to_string(),
            log_x,
            log_y,
            series,
        }
    }

    fn log_log() -> Chart {
        chart(
            true,
            true,
            vec![
                series(
                    "from_vm",
                    &[(1e6, 80.0), (1.0, 40.0), (1e3, 45.0), (1e5, 60.0)],
                    false,
                ),
                series(
                    "to_vm",
                    &[(1.0, 30.0), (1e3, 31.0), (1e5, 35.0), (1e6, 2e6)],
                    true,
                ),
            ],
        )
    }

    #[test]
    fn log_log_chart() {
        let svg = render(&log_log()).unwrap();
        assert!(svg.starts_with("<svg "));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(">from_vm</text>"));
        assert!(svg.contains(">to_vm</text>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(">1M</text>"));
        assert!(svg.contains(">10M</text>"));
        assert!(svg.contains(">1k</text>"));
        assert!(svg.contains(">1</text>"));
        assert!(svg.contains("stroke-dasharray"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Deterministic.
        assert_eq!(svg, render(&log_log()).unwrap());
    }

    #[test]
    fn points_sorted_by_x() {
        let svg = render(&chart(
            false,
            false,
            vec![series("s", &[(2.0, 1.0), (0.0, 1.0), (1.0, 1.0)], false)],
        ))
        .unwrap();
        let pts = svg.split("points=\"").nth(1).unwrap();
        let pts = &pts[..pts.find('"').unwrap()];
        let xs: Vec<f64> = pts
            .split(' ')
            .map(|p| p.split(',').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(xs.len(), 3);
        assert!(xs.windows(2).all(|w| w[0] < w[1]), "{pts}");
    }

    #[test]
    fn coordinates_have_at_most_one_decimal() {
        let svg = render(&log_log()).unwrap();
        for attr in ["x=\"", "y=\"", "cx=\"", "cy=\"", "points=\""] {
            for part in svg.split(attr).skip(1) {
                let value = &part[..part.find('"').unwrap()];
                for number in value.split([' ', ',']) {
                    let decimals = number.split_once('.').map_or(0, |(_, d)| d.len());
                    assert!(decimals <= 1, "{attr}{value}");
                }
            }
        }
    }

    #[test]
    fn single_point_and_all_equal() {
        for (log_x, log_y) in [(false, false), (true, true), (true, false), (false, true)] {
            let one = chart(log_x, log_y, vec![series("one", &[(5.0, 7.0)], false)]);
            let svg = render(&one).unwrap();
            assert!(svg.contains("<circle"));
            assert!(!svg.contains("<polyline"));
            let equal = chart(
                log_x,
                log_y,
                vec![series("eq", &[(100.0, 3.0), (100.0, 3.0)], false)],
            );
            assert!(render(&equal).unwrap().contains("<polyline"));
        }
        let zeros = chart(false, false, vec![series("z", &[(0.0, 0.0)], false)]);
        assert!(render(&zeros).is_ok());
        let negative = chart(false, false, vec![series("n", &[(-3.0, -3.0)], false)]);
        assert!(render(&negative).is_ok());
    }

    #[test]
    fn log_axis_rejects_zero() {
        let ch = chart(false, true, vec![series("bad", &[(1.0, 0.0)], false)]);
        assert_eq!(
            render(&ch),
            Err(PlotError::NonPositiveOnLogAxis {
                series: "bad".to_string(),
                value: 0.0
            })
        );
        let ch = chart(true, false, vec![series("neg", &[(-1.0, 5.0)], false)]);
        assert!(matches!(
            render(&ch),
            Err(PlotError::NonPositiveOnLogAxis { .. })
        ));
        // Zero is fine on a linear axis.
        let ch = chart(true, false, vec![series("ok", &[(1.0, 0.0)], false)]);
        assert!(render(&ch).is_ok());
    }

    #[test]
    fn non_finite_rejected() {
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let ch = chart(false, false, vec![series("nan", &[(1.0, v)], false)]);
            assert_eq!(
                render(&ch),
                Err(PlotError::NotFinite {
                    series: "nan".to_string()
                })
            );
        }
    }

    #[test]
    fn no_points() {
        assert_eq!(render(&chart(true, true, vec![])), Err(PlotError::NoPoints));
        let empty = chart(false, false, vec![series("e", &[], false)]);
        assert_eq!(render(&empty), Err(PlotError::NoPoints));
        assert!(!PlotError::NoPoints.to_string().is_empty());
    }

    #[test]
    fn escaping() {
        let mut ch = chart(
            false,
            false,
            vec![series("a<b> & \"c\"", &[(1.0, 1.0)], false)],
        );
        ch.title = "x < y & z > w".to_string();
        let svg = render(&ch).unwrap();
        assert!(svg.contains("a&lt;b&gt; &amp; &quot;c&quot;"));
        assert!(svg.contains("x &lt; y &amp; z &gt; w"));
        assert!(!svg.contains("a<b>"));
        assert!(!svg.contains("& "));
    }

    #[test]
    fn linear_ticks() {
        let axis = Axis::linear(3.0, 1.4e6);
        let labels: Vec<_> = axis.ticks.iter().filter_map(|t| t.label.clone()).collect();
        assert_eq!(
            labels,
            ["0", "200k", "400k", "600k", "800k", "1M", "1.2M", "1.4M"]
        );
        let axis = Axis::linear(0.2, 2.6);
        let labels: Vec<_> = axis.ticks.iter().filter_map(|t| t.label.clone()).collect();
        assert_eq!(labels, ["0", "0.5", "1", "1.5", "2", "2.5", "3"]);
        let axis = Axis::linear(-12.0, 7.0);
        let labels: Vec<_> = axis.ticks.iter().filter_map(|t| t.label.clone()).collect();
        assert_eq!(labels, ["-15", "-10", "-5", "0", "5", "10"]);
        for (min, max) in [(0.0, 1.0), (1.0, 1e9), (-1e-7, 3e-7), (7.0, 7.0)] {
            let n = Axis::linear(min, max).ticks.len();
            assert!((4..=9).contains(&n), "{min}..{max}: {n} ticks");
        }
    }

    #[test]
    fn log_ticks() {
        let axis = Axis::log(0.05, 3e7);
        let labels: Vec<_> = axis.ticks.iter().filter_map(|t| t.label.clone()).collect();
        assert_eq!(
            labels,
            ["0.01", "0.1", "1", "10", "100", "1k", "10k", "100k", "1M", "10M", "100M"]
        );
        let axis = Axis::log(1.0, 1000.0);
        assert_eq!((axis.lo, axis.hi), (0.0, 3.0));
    }

    #[test]
    fn extreme_values_do_not_panic() {
        let extremes = [
            (f64::MIN, f64::MAX),
            (f64::MAX, f64::MAX),
            (0.0, f64::MIN_POSITIVE),
            (0.0, 5e-324),
            (1.0, 1.0 + f64::EPSILON),
            (-f64::MAX, -f64::MAX),
        ];
        for (a, b) in extremes {
            let ch = chart(false, false, vec![series("x", &[(a, a), (b, b)], false)]);
            let svg = render(&ch).unwrap();
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{a} {b}");
        }
        for (a, b) in [(5e-324, f64::MAX), (f64::MAX, f64::MAX), (1e-300, 1e-300)] {
            let ch = chart(true, true, vec![series("x", &[(a, a), (b, b)], false)]);
            let svg = render(&ch).unwrap();
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{a} {b}");
        }
    }

    #[test]
    fn many_series_and_long_names() {
        let many: Vec<_> = (0..20)
            .map(|i| {
                let name = format!("series number {i} with a rather long name");
                series(&name, &[(1.0, f64::from(i)), (2.0, 1.0)], i % 2 == 0)
            })
            .collect();
        let svg = render(&chart(false, false, many)).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 20);
    }

    #[test]
    fn coordinate_format() {
        assert_eq!(c(12.0), "12");
        assert_eq!(c(12.04), "12");
        assert_eq!(c(12.06), "12.1");
        assert_eq!(c(-0.01), "0");
        assert_eq!(c(f64::NAN), "0");
    }

    #[test]
    fn number_labels() {
        assert_eq!(number_label(1.5e6, 5e5), "1.5M");
        assert_eq!(number_label(2e5, 1e5), "200k");
        assert_eq!(number_label(12.0, 2.0), "12");
        assert_eq!(number_label(0.5, 0.5), "0.5");
        assert_eq!(number_label(0.25, 0.05), "0.25");
        assert_eq!(number_label(1000.2, 0.2), "1000.2");
        assert_eq!(number_label(2e-7, 1e-7), "2e-7");
        assert_eq!(power_label(-2.0), "0.01");
        assert_eq!(power_label(7.0), "10M");
        assert_eq!(power_label(-5.0), "1e-5");
        assert_eq!(power_label(20.0), "1e20");
    }
}
