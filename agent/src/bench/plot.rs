//! SVG plots of a bench run (plotters): accuracy against WAN bytes and against time
//! (virtual, or the real agents' clock), one line per policy.

use super::BenchReport;
use super::peer::PeerRun;
use super::real::RealCheck;
use crate::sim::EvalPoint;
use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::path::Path;

const COLORS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

/// Which axis to plot accuracy against.
#[derive(Debug, Clone, Copy)]
pub enum Axis {
    /// WAN bytes (log scale; LAN-only, with none, is left out).
    WanBytes,
    /// Virtual seconds.
    VirtualTime,
    /// Real seconds on the agents' clock (`--real` runs).
    RealTime,
}

/// One line: a name and (x, top-1 %) points.
type Series<'a> = (&'a str, Vec<(f64, f64)>);

fn series_of<'a>(name: &'a str, curve: &[EvalPoint], axis: Axis) -> Series<'a> {
    let pts = curve
        .iter()
        .map(|p| {
            let x = match axis {
                Axis::WanBytes => p.wan_bytes.max(1) as f64,
                Axis::VirtualTime | Axis::RealTime => p.virtual_seconds,
            };
            (x, p.min_accuracy * 100.0)
        })
        .collect();
    (name, pts)
}

/// Writes one SVG of the simulated runs.
pub fn accuracy_against(report: &BenchReport, axis: Axis, path: &Path) -> Result<()> {
    let series: Vec<Series<'_>> = report
        .results
        .iter()
        .filter(|r| !matches!(axis, Axis::WanBytes) || r.wan_bytes > 0)
        .map(|r| series_of(&r.policy, &r.curve, axis))
        .collect();
    draw(&report.scenario, axis, &series, path)
}

/// Writes one SVG of the `--real` agents' runs and the peers' beside them (`axis` is
/// [`Axis::RealTime`] or [`Axis::WanBytes`]).
pub fn real_accuracy_against(
    scenario: &str,
    checks: &[RealCheck],
    peers: &[PeerRun],
    axis: Axis,
    path: &Path,
) -> Result<()> {
    let peer_curves: Vec<_> = peers.iter().map(|p| (p.name.as_str(), p.curve())).collect();
    let series: Vec<Series<'_>> = checks
        .iter()
        .map(|c| series_of(&c.policy, &c.curve, axis))
        .chain(peer_curves.iter().map(|(n, c)| series_of(n, c, axis)))
        .collect();
    draw(&format!("{scenario}, real agents"), axis, &series, path)
}

fn draw(title: &str, axis: Axis, series: &[Series<'_>], path: &Path) -> Result<()> {
    let xs = series.iter().flat_map(|(_, p)| p.iter().map(|(x, _)| *x));
    let (lo, hi) = xs.fold((f64::INFINITY, 0.0f64), |(l, h), x| (l.min(x), h.max(x)));
    if !lo.is_finite() {
        return Err(anyhow!("nothing to plot"));
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let caption = format!(
        "{title}: lowest-region top-1 (%) vs {}",
        match axis {
            Axis::WanBytes => "WAN bytes",
            Axis::VirtualTime => "virtual seconds",
            Axis::RealTime => "seconds",
        }
    );
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50);
    // The two axes give charts of different types: one body for both.
    macro_rules! finish {
        ($chart:expr, $x_desc:expr) => {{
            let mut chart = $chart.map_err(|e| anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .x_desc($x_desc)
                .y_desc("top-1 %")
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            for (i, (name, pts)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                chart
                    .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| anyhow!("{e}"))?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
        }};
    }
    match axis {
        Axis::WanBytes => finish!(
            builder.build_cartesian_2d((lo..hi * 1.1).log_scale(), 0.0..100.0),
            "WAN bytes (log)"
        ),
        Axis::VirtualTime => finish!(
            builder.build_cartesian_2d(0.0..hi * 1.05, 0.0..100.0),
            "virtual seconds"
        ),
        Axis::RealTime => finish!(
            builder.build_cartesian_2d(0.0..hi * 1.05, 0.0..100.0),
            "seconds on the agents' clock"
        ),
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
