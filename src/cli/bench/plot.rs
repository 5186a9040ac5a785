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

/// An axis value without trailing zeros: 1000 rather than "1000.0", 0.25 as it is.
fn tidy(x: &f64) -> String {
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

fn upper(max: f64) -> f64 {
    if max.is_finite() && max > 0.0 {
        max * 1.15
    } else {
        1.0
    }
}

/// One colour per dtype, as the command line names them (others take the palette's).
fn dtype_color(dtype: &str, index: usize) -> RGBAColor {
    match dtype {
        "f32" => RGBColor(31, 119, 180).to_rgba(),
        "f16" => RGBColor(230, 120, 20).to_rgba(),
        "bf16" => RGBColor(44, 160, 44).to_rgba(),
        "fp8" => RGBColor(200, 40, 40).to_rgba(),
        _ => Palette99::pick(index + 10).to_rgba(),
    }
}

/// Throughput (x) against batch latency p50 / p90 / p99 (y): one colour per dtype, the
/// percentile told by the line (p50 solid, p90 dashed, p99 dotted) and the marker (circle,
/// triangle, cross). Each dtype's p50 points are labelled with their batch size, the labels
/// of different dtypes stacked apart so that small batches near the origin stay readable.
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
        .x_label_formatter(&tidy)
        .y_desc("batch latency (ms)")
        .y_label_formatter(&tidy)
        .axis_desc_style((FAMILY, 20))
        .label_style((FAMILY, 15))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    let mut dtypes: Vec<&'static str> = points.iter().map(|p| p.dtype).collect();
    dtypes.dedup();
    let mut series = 0;
    for (d, dtype) in dtypes.into_iter().enumerate() {
        let color = dtype_color(dtype, d);
        let mut pts: Vec<&LocalPoint> = points.iter().filter(|p| p.dtype == dtype).collect();
        pts.sort_by_key(|p| p.batch_size);
        let at = |pick: fn(&Percentiles) -> f64| -> Vec<(f64, f64)> {
            pts.iter()
                .map(|p| (p.nonces_per_second, pick(&p.latency)))
                .collect()
        };
        let (p50, p90, p99) = (at(|l| l.p50), at(|l| l.p90), at(|l| l.p99));
        let plot_err = |e| anyhow!("plot: {e}");
        chart
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(3)))
            .map_err(plot_err)?
            .label(format!("{dtype} p50"))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (24, 0)], color.stroke_width(3))
                    + Circle::new((12, 0), 4, color.filled())
            });
        chart
            .draw_series(p50.iter().map(|&c| Circle::new(c, 5, color.filled())))
            .map_err(plot_err)?;
        chart
            .draw_series(DashedLineSeries::new(
                p90.clone(),
                10,
                6,
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("{dtype} p90"))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (9, 0)], color.stroke_width(2))
                    + PathElement::new(vec![(15, 0), (24, 0)], color.stroke_width(2))
                    + TriangleMarker::new((12, 0), 5, color.filled())
            });
        chart
            .draw_series(
                p90.iter()
                    .map(|&c| TriangleMarker::new(c, 6, color.filled())),
            )
            .map_err(plot_err)?;
        chart
            .draw_series(DashedLineSeries::new(
                p99.clone(),
                2,
                5,
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(format!("{dtype} p99"))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (3, 0)], color.stroke_width(2))
                    + PathElement::new(vec![(21, 0), (24, 0)], color.stroke_width(2))
                    + Cross::new((12, 0), 5, color.stroke_width(2))
            });
        chart
            .draw_series(p99.iter().map(|&c| Cross::new(c, 6, color.stroke_width(2))))
            .map_err(plot_err)?;
        // Batch sizes above the p50 points, each dtype's a line higher than the one before.
        let dy = -22 - 16 * d as i32;
        chart
            .draw_series(pts.iter().zip(&p50).map(|(p, &c)| {
                EmptyElement::at(c)
                    + Text::new(
                        format!("b{}", p.batch_size),
                        (8, dy),
                        (FAMILY, 14).into_font().color(&color),
                    )
            }))
            .map_err(plot_err)?;
        series += 3;
    }
    if series > 0 {
        chart
            .configure_series_labels()
            .label_font((FAMILY, 15))
            .legend_area_size(30)
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
    // Room above the title, which would otherwise touch the top edge.
    let root = root
        .margin(14, 0, 0, 0)
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
        .x_label_formatter(&tidy)
        .y_desc("result lines (cumulative)")
        .y_label_formatter(&tidy)
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
        .x_label_formatter(&tidy)
        .y_desc("/health latency (ms)")
        .y_label_formatter(&tidy)
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

#[cfg(test)]
mod tests {
    #[test]
    fn axis_values_have_no_trailing_zeros() {
        assert_eq!(super::tidy(&1000.0), "1000");
        assert_eq!(super::tidy(&0.25), "0.25");
        assert_eq!(super::tidy(&0.0), "0");
        assert_eq!(super::tidy(&12.5), "12.5");
    }
}
