//! The run folder's picture, drawn with plotters into a PNG. Text uses the DejaVu Sans font
//! shipped in assets/fonts (no system font lookup).

use super::stats::Percentiles;
use super::PLOT_SIZE;
use anyhow::anyhow;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn font_ready() -> anyhow::Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .map_err(|_| "the shipped font cannot be read".to_owned())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One (dtype, batch size) of a local sweep.
#[derive(Debug, Clone)]
pub struct LocalPoint {
    /// The dtype as the command line names it (`fp8` included).
    pub dtype: &'static str,
    pub batch_size: u64,
    pub nonces_per_second: f64,
    pub latency: Percentiles,
}

fn upper(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

/// Throughput (x) against batch latency p50 / p90 / p99 (y), one line per dtype and
/// percentile, each point labelled with its batch size.
pub fn local(path: &Path, title: &str, points: &[LocalPoint]) -> anyhow::Result<()> {
    font_ready()?;
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let xmax = upper(
        points
            .iter()
            .map(|p| p.nonces_per_second)
            .fold(0.0, f64::max),
    );
    let ymax = upper(points.iter().map(|p| p.latency.p99).fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 26))
        .margin(20)
        .x_label_area_size(60)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("throughput (nonces/s)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("batch latency (ms)")
        .axis_desc_style((FAMILY, 20))
        .label_style((FAMILY, 15))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    let mut dtypes: Vec<&'static str> = points.iter().map(|p| p.dtype).collect();
    dtypes.dedup();
    let mut series = 0;
    for dtype in dtypes {
        let mut pts: Vec<&LocalPoint> = points.iter().filter(|p| p.dtype == dtype).collect();
        pts.sort_by_key(|p| p.batch_size);
        for (name, pick) in [
            ("p50", (|l: &Percentiles| l.p50) as fn(&Percentiles) -> f64),
            ("p90", |l: &Percentiles| l.p90),
            ("p99", |l: &Percentiles| l.p99),
        ] {
            let color = Palette99::pick(series).to_rgba();
            series += 1;
            let xy: Vec<(f64, f64)> = pts
                .iter()
                .map(|p| (p.nonces_per_second, pick(&p.latency)))
                .collect();
            chart
                .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("plot: {e}"))?
                .label(format!("{dtype} {name}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(xy.iter().map(|&c| Circle::new(c, 4, color.filled())))
                .map_err(|e| anyhow!("plot: {e}"))?;
            if name == "p50" {
                chart
                    .draw_series(
                        pts.iter().zip(&xy).map(|(p, &c)| {
                            Text::new(format!("b{}", p.batch_size), c, (FAMILY, 14))
                        }),
                    )
                    .map_err(|e| anyhow!("plot: {e}"))?;
            }
        }
    }
    if series > 0 {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}

/// A server run: results per job over time (top) and /health latency over time (bottom).
/// `jobs`: per job, (seconds since the run started, lines so far); `health`: (seconds since
/// the run started, latency in ms) of every answered probe.
pub fn server(
    path: &Path,
    title: &str,
    jobs: &[Vec<(f64, f64)>],
    health: &[(f64, f64)],
) -> anyhow::Result<()> {
    font_ready()?;
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let root = root
        .titled(title, (FAMILY, 26))
        .map_err(|e| anyhow!("plot: {e}"))?;
    let (top, bottom) = root.split_vertically(PLOT_SIZE.1 / 2 - 20);
    let tmax = upper(
        jobs.iter()
            .flatten()
            .map(|p| p.0)
            .chain(health.iter().map(|p| p.0))
            .fold(0.0, f64::max),
    );
    let lmax = upper(jobs.iter().flatten().map(|p| p.1).fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(&top)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..tmax, 0f64..lmax)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("result lines (cumulative)")
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    for (i, j) in jobs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(j.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(format!("job {}", i + 1))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if !jobs.is_empty() {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("plot: {e}"))?;
    }
    let hmax = upper(health.iter().map(|p| p.1).fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(&bottom)
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..tmax, 0f64..hmax)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("/health latency (ms)")
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .draw_series(
            health
                .iter()
                .map(|&c| Circle::new(c, 2, RGBColor(200, 60, 40).filled())),
        )
        .map_err(|e| anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}
