//! The pictures: each measurement's raw samples, typed, and the SVG files
//! drawn from them (time to ban as CDFs on a log axis, bans over a flood).

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use spamdelay_tests::bench::{percentile, sorted};

/// One tool's (or path's) time to ban, one sample per client.
pub(crate) struct Cdf {
    /// As the legend shows it.
    pub(crate) label: String,
    /// Milliseconds from a client's first payload to its block.
    pub(crate) ms: Vec<f64>,
}

/// What the measurements hand over for plotting; empty for a phase that
/// did not run (`--only`) or has nothing to draw.
#[derive(Default)]
pub(crate) struct Samples {
    pub(crate) time_to_ban: Vec<Cdf>,
    /// Seconds from the flood's first payload at which each ban reached nft,
    /// in order.
    pub(crate) flood_bans_at: Vec<f64>,
    /// Seconds from the flood's first payload at which each payload left,
    /// in order: the pace the bans can follow at best.
    pub(crate) flood_payloads_at: Vec<f64>,
}

impl Samples {
    pub(crate) fn merge(&mut self, other: Samples) {
        self.time_to_ban.extend(other.time_to_ban);
        self.flood_bans_at.extend(other.flood_bans_at);
        self.flood_payloads_at.extend(other.flood_payloads_at);
    }
}

const TIME_TO_BAN_SVG: &str = "time-to-ban.svg";
const FLOOD_SVG: &str = "flood.svg";

const SIZE: (u32, u32) = (900, 560);
/// Distinct at a glance, and readable on white.
const COLORS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
];
/// Height of one legend line under the time-to-ban chart.
const LEGEND_LINE: u32 = 22;
/// A flood of 100,000 bans drawn through at most this many points.
const MAX_POINTS: usize = 2000;

/// Draws what there is into `dir`; the files written.
pub(crate) fn write(dir: &Path, samples: &Samples) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let cdfs: Vec<&Cdf> = samples
        .time_to_ban
        .iter()
        .filter(|c| !sorted(&c.ms).is_empty())
        .collect();
    if !cdfs.is_empty() {
        let path = dir.join(TIME_TO_BAN_SVG);
        time_to_ban(&path, &cdfs).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        written.push(path);
    }
    if !samples.flood_bans_at.is_empty() || !samples.flood_payloads_at.is_empty() {
        let path = dir.join(FLOOD_SVG);
        flood(&path, &samples.flood_bans_at, &samples.flood_payloads_at)
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// CDFs of time to ban, all on one log-scale axis in milliseconds: the
/// kernel's bridge in microseconds and fail2ban in seconds side by side.
fn time_to_ban(path: &Path, cdfs: &[&Cdf]) -> DrawResult {
    let all: Vec<f64> = cdfs
        .iter()
        .flat_map(|c| c.ms.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let all = sorted(&all);
    let (lo, hi) = match (all.first(), all.last()) {
        (Some(&lo), Some(&hi)) => (decade_below(lo), decade_above(hi)),
        _ => (1e-3, 1e3),
    };
    // The legend goes below the chart: CDFs that span decades leave no
    // corner of the plot free.
    let legend_h = LEGEND_LINE * cdfs.len() as u32 + 16;
    let root = SVGBackend::new(path, (SIZE.0, SIZE.1 + legend_h)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(SIZE.1);
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            "Time to ban: first payload → block (CDF)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..100.0)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("% of clients blocked")
        .x_label_formatter(&|v| fmt_axis_ms(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, cdf) in cdfs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let v = sorted(&cdf.ms);
        let n = v.len() as f64;
        // A step per sample: up at each value, flat until the next one.
        let steps = v.iter().enumerate().flat_map(|(k, &x)| {
            let x = x.max(lo);
            [(x, 100.0 * k as f64 / n), (x, 100.0 * (k + 1) as f64 / n)]
        });
        chart.draw_series(LineSeries::new(steps, color.stroke_width(2)))?;
        let y = (LEGEND_LINE * i as u32) as i32 + 8;
        lower.draw(&PathElement::new(
            [(80, y + 8), (110, y + 8)],
            color.stroke_width(3),
        ))?;
        lower.draw(&Text::new(
            format!(
                "{} (n = {}): p50 {} ms, p99 {} ms",
                cdf.label,
                v.len(),
                fmt_sample_ms(percentile(&v, 50.0)),
                fmt_sample_ms(percentile(&v, 99.0))
            ),
            (120, y),
            ("sans-serif", 15),
        ))?;
    }
    root.present()?;
    Ok(())
}

/// Cumulative bans over the flood, from its first payload, over the
/// cumulative payloads they answer.
fn flood(path: &Path, bans_at: &[f64], payloads_at: &[f64]) -> DrawResult {
    let n = bans_at.len().max(payloads_at.len());
    let end = bans_at
        .iter()
        .chain(payloads_at)
        .copied()
        .fold(0.0, f64::max)
        .max(1e-3);
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Flood: {} distinct IPv6 early talkers, banned over time",
                payloads_at.len()
            ),
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..end * 1.05, 0.0..n as f64 * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("seconds from the first payload")
        .y_desc("clients (cumulative)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    for (i, (what, at)) in [
        ("payloads sent (early talk)", payloads_at),
        ("bans in nft (`nft monitor`)", bans_at),
    ]
    .into_iter()
    .enumerate()
    {
        if at.is_empty() {
            continue;
        }
        let color = COLORS[i];
        chart
            .draw_series(LineSeries::new(cumulative(at), color.stroke_width(2)))?
            .label(format!("{what}: {}", at.len()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present()?;
    Ok(())
}

/// (t, k): k events by time t, through at most `MAX_POINTS` points.
fn cumulative(at: &[f64]) -> impl Iterator<Item = (f64, f64)> + '_ {
    let n = at.len();
    let step = n.div_ceil(MAX_POINTS).max(1);
    at.iter()
        .enumerate()
        .filter(move |(k, _)| k % step == 0 || *k == n - 1)
        .map(|(k, &t)| (t, (k + 1) as f64))
}

fn decade_below(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

fn decade_above(v: f64) -> f64 {
    10f64.powf(v.log10().ceil()).max(decade_below(v) * 10.0)
}

fn fmt_axis_ms(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.0}")
    } else {
        // 0.001, 0.01, 0.1 without trailing noise.
        let digits = (-v.log10()).ceil().max(1.0) as usize;
        format!("{v:.digits$}")
    }
}

/// Three significant digits, for the legend.
fn fmt_sample_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}
