//! The figures dorac draws, through `plotters` into an RGB buffer, encoded as PNG by `image`
//! and written atomically: the loss curve of a training run ([`loss_curve`]) and the paper's
//! magnitude / direction scatter ([`scatter`], used by `dorac analyze`).
//!
//! Text is set in DejaVu Sans, compiled in (the `dejavu` crate), so a figure looks the same on a
//! machine without any fonts installed.

use crate::error::{Error, Result, Subject};
use crate::tensors_io::write_atomic;
use image::ImageEncoder;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";
const MIN_WIDTH: u32 = 200;
const MIN_HEIGHT: u32 = 150;
const MAX_SIDE: u32 = 8192;

/// The colours of a series, in order (the usual categorical palette).
pub const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Only fails for bytes that are not a font; these are DejaVu's own.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draws with `draw` on a white `width` x `height` canvas and writes it to `path` as PNG.
fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    if !(MIN_WIDTH..=MAX_SIDE).contains(&width) || !(MIN_HEIGHT..=MAX_SIDE).contains(&height) {
        return Err(Error::input_at(Subject::file(path), format!("plot size {width}x{height} out of range (width {MIN_WIDTH}..={MAX_SIDE}, height {MIN_HEIGHT}..={MAX_SIDE})")));
    }
    register_font();
    let mut rgb = vec![255u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        let failed =
            |e: String| Error::input_at(Subject::file(path), format!("drawing failed: {e}"));
        root.fill(&WHITE).map_err(|e| failed(e.to_string()))?;
        draw(&root).map_err(failed)?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&rgb, width, height, image::ColorType::Rgb8)
        .map_err(|e| Error::input_at(Subject::file(path), format!("PNG encoding failed: {e}")))?;
    write_atomic(path, &png)
}

/// Converts any plotting error to its message.
fn msg<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

/// A y range covering `values` (finite ones) with a 5% margin; `(0, 1)` when there are none.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let span = if hi > lo { hi - lo } else { lo.abs().max(1e-3) };
    (lo - 0.05 * span, hi + 0.05 * span)
}

/// Debiased exponential moving average of the finite values (non-finite ones stay gaps), with
/// a horizon of about a fortieth of the run.
pub fn ema(values: &[f64]) -> Vec<f64> {
    let n = values.iter().filter(|v| v.is_finite()).count();
    let beta = (1.0 - 1.0 / (n as f64 / 40.0).max(2.0)).min(0.995);
    let (mut avg, mut weight) = (0.0, 0.0);
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return f64::NAN;
            }
            avg = beta * avg + (1.0 - beta) * v;
            weight = beta * weight + (1.0 - beta);
            avg / weight
        })
        .collect()
}

/// Splits `(x, y)` points into runs of finite values, so a curve shows gaps where a value was
/// not finite.
fn finite_runs(points: &[(f64, f64)]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = vec![vec![]];
    for &(x, y) in points {
        if y.is_finite() {
            runs.last_mut().unwrap().push((x, y));
        } else if !runs.last().unwrap().is_empty() {
            runs.push(vec![]);
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// What a loss curve shows: the training loss per step, and evaluations when there were any.
pub struct LossCurve<'a> {
    /// `(step, loss)`, steps counted from 1.
    pub train: &'a [(f64, f64)],
    /// `(step, eval loss)`.
    pub eval: &'a [(f64, f64)],
    /// `(step, eval accuracy in [0, 1])`, drawn on a second axis on the right.
    pub accuracy: &'a [(f64, f64)],
}

/// With more training points than this, a smoothed curve is drawn over the raw one.
const SMOOTH_MIN_POINTS: usize = 20;

/// Writes the loss curve: the training loss (faint, with its moving average over it when the run
/// is long enough), the eval loss as points joined by a line, and the eval accuracy on a right
/// axis. The y axis is logarithmic when the losses span more than two decades.
pub fn loss_curve(path: &Path, size: (u32, u32), curve: &LossCurve) -> Result<()> {
    let losses = || {
        curve
            .train
            .iter()
            .chain(curve.eval)
            .map(|p| p.1)
            .filter(|v| v.is_finite())
    };
    let steps = curve.train.iter().chain(curve.eval).map(|p| p.0);
    let x_hi = steps.fold(1.0f64, f64::max);
    let (lo, hi) = losses().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let log_y = lo > 0.0 && hi / lo > 100.0;
    let smooth = curve.train.len() > SMOOTH_MIN_POINTS;
    let smoothed: Vec<(f64, f64)> = {
        let ys: Vec<f64> = curve.train.iter().map(|p| p.1).collect();
        curve.train.iter().map(|p| p.0).zip(ema(&ys)).collect()
    };
    render(path, size, |root| {
        let train_colour = if smooth {
            PALETTE[0].mix(0.35)
        } else {
            PALETTE[0].mix(1.0)
        };
        let mut chart = ChartBuilder::on(root);
        chart
            .caption("loss", (FONT, 18))
            .margin(12)
            .x_label_area_size(34)
            .y_label_area_size(56);
        if !curve.accuracy.is_empty() {
            chart.right_y_label_area_size(48);
        }
        // One closure per axis kind: plotters types linear and log axes differently.
        macro_rules! draw_on {
            ($chart:ident) => {{
                $chart
                    .configure_mesh()
                    .x_desc("step")
                    .x_label_formatter(&|v| format!("{v:.0}"))
                    .y_desc("loss")
                    .light_line_style(WHITE.mix(0.0))
                    .draw()
                    .map_err(msg)?;
                for run in finite_runs(curve.train) {
                    $chart
                        .draw_series(LineSeries::new(run, train_colour.stroke_width(1)))
                        .map_err(msg)?;
                }
                $chart
                    .draw_series(std::iter::once(PathElement::new(vec![], train_colour)))
                    .map_err(msg)?
                    .label("train loss")
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], train_colour.stroke_width(2))
                    });
                if smooth {
                    for run in finite_runs(&smoothed) {
                        $chart
                            .draw_series(LineSeries::new(run, PALETTE[0].stroke_width(2)))
                            .map_err(msg)?;
                    }
                    $chart
                        .draw_series(std::iter::once(PathElement::new(vec![], PALETTE[0])))
                        .map_err(msg)?
                        .label("train loss (moving average)")
                        .legend(|(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[0].stroke_width(2))
                        });
                }
                if !curve.eval.is_empty() {
                    let eval: Vec<(f64, f64)> = curve
                        .eval
                        .iter()
                        .copied()
                        .filter(|p| p.1.is_finite())
                        .collect();
                    $chart
                        .draw_series(LineSeries::new(eval.clone(), PALETTE[1].stroke_width(2)))
                        .map_err(msg)?
                        .label("eval loss")
                        .legend(|(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[1].stroke_width(2))
                        });
                    $chart
                        .draw_series(eval.iter().map(|&p| Circle::new(p, 3, PALETTE[1].filled())))
                        .map_err(msg)?;
                }
                if !curve.accuracy.is_empty() {
                    let acc: Vec<(f64, f64)> = curve.accuracy.to_vec();
                    $chart
                        .configure_secondary_axes()
                        .y_desc("eval accuracy")
                        .draw()
                        .map_err(msg)?;
                    $chart
                        .draw_secondary_series(LineSeries::new(
                            acc.clone(),
                            PALETTE[2].stroke_width(2),
                        ))
                        .map_err(msg)?
                        .label("eval accuracy (right axis)")
                        .legend(|(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], PALETTE[2].stroke_width(2))
                        });
                    $chart
                        .draw_secondary_series(
                            acc.iter()
                                .map(|&p| TriangleMarker::new(p, 4, PALETTE[2].filled())),
                        )
                        .map_err(msg)?;
                }
                $chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperRight)
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK.mix(0.3))
                    .label_font((FONT, 13))
                    .draw()
                    .map_err(msg)?;
            }};
        }
        let x_range = 0.0..x_hi;
        if log_y {
            let mut c = chart
                .build_cartesian_2d(x_range, (lo * 0.8..hi * 1.25).log_scale())
                .map_err(msg)?
                .set_secondary_coord(0.0..x_hi, 0.0..1.0);
            draw_on!(c);
        } else {
            let (y0, y1) = padded_range(losses());
            let mut c = chart
                .build_cartesian_2d(x_range, y0..y1)
                .map_err(msg)?
                .set_secondary_coord(0.0..x_hi, 0.0..1.0);
            draw_on!(c);
        }
        Ok(())
    })
}

/// A tick's number: three decimals in the usual range, scientific notation for small ones.
fn tick_label(v: f64) -> String {
    if v == 0.0 || v.abs() >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.1e}")
    }
}

/// One point of a scatter: its series (colour) and its group (marker shape).
pub struct ScatterPoint {
    pub x: f64,
    pub y: f64,
    pub series: usize,
    pub group: usize,
}

/// A scatter plot: points in coloured series with per-group markers, and one fitted line per
/// series (given as `(slope, intercept)` in data units), labelled in the legend.
pub struct Scatter<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Legend text per series (the fit's numbers included by the caller).
    pub series: &'a [String],
    pub groups: &'a [String],
    pub points: &'a [ScatterPoint],
    /// Per series, the fitted line when there is one.
    pub fits: &'a [Option<(f64, f64)>],
}

/// Draws the marker of group `g` at `p` in data coordinates: circle, square, triangle, cross,
/// then the same shapes hollow.
fn draw_marker<DB: DrawingBackend>(
    chart: &mut ChartContext<DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    p: (f64, f64),
    g: usize,
    colour: RGBColor,
) -> std::result::Result<(), String> {
    let style = if (g / 4).is_multiple_of(2) {
        colour.filled()
    } else {
        colour.stroke_width(1)
    };
    let area = chart.plotting_area();
    match g % 4 {
        0 => area.draw(&Circle::new(p, 4, style)),
        1 => area.draw(&(EmptyElement::at(p) + Rectangle::new([(-4, -4), (4, 4)], style))),
        2 => area.draw(&TriangleMarker::new(p, 5, style)),
        _ => area.draw(&Cross::new(p, 4, colour.stroke_width(2))),
    }
    .map_err(msg)
}

/// Writes a scatter plot (see [`Scatter`]).
pub fn scatter(path: &Path, size: (u32, u32), plot: &Scatter) -> Result<()> {
    let (x0, x1) = padded_range(plot.points.iter().map(|p| p.x));
    let (y0, y1) = padded_range(plot.points.iter().map(|p| p.y));
    render(path, size, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(plot.title, (FONT, 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(msg)?;
        chart
            .configure_mesh()
            .x_desc(plot.x_label)
            .y_desc(plot.y_label)
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|v| tick_label(*v))
            .y_label_formatter(&|v| tick_label(*v))
            .draw()
            .map_err(msg)?;
        for (s, name) in plot.series.iter().enumerate() {
            let colour = PALETTE[s % PALETTE.len()];
            let pts = plot.points.iter().filter(|p| p.series == s);
            // Marker elements borrow the backend's lifetime; draw them one by one.
            for p in pts {
                draw_marker(&mut chart, (p.x, p.y), p.group, colour)?;
            }
            let line = match plot.fits.get(s).copied().flatten() {
                Some((slope, intercept)) => {
                    vec![(x0, intercept + slope * x0), (x1, intercept + slope * x1)]
                }
                None => vec![],
            };
            chart
                .draw_series(std::iter::once(PathElement::new(
                    line,
                    colour.stroke_width(2),
                )))
                .map_err(msg)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        // Groups in the legend, their markers drawn in grey.
        let grey = RGBColor(90, 90, 90);
        for (g, name) in plot.groups.iter().enumerate() {
            let style = if (g / 4).is_multiple_of(2) {
                grey.filled()
            } else {
                grey.stroke_width(1)
            };
            let entry = chart
                .draw_series(std::iter::once(EmptyElement::at((x0, y0))))
                .map_err(msg)?;
            entry.label(name.clone());
            match g % 4 {
                0 => entry.legend(move |(x, y)| Circle::new((x + 9, y), 4, style)),
                1 => entry
                    .legend(move |(x, y)| Rectangle::new([(x + 5, y - 4), (x + 13, y + 4)], style)),
                2 => entry.legend(move |(x, y)| TriangleMarker::new((x + 9, y), 5, style)),
                _ => entry.legend(move |(x, y)| Cross::new((x + 9, y), 4, grey.stroke_width(2))),
            };
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .label_font((FONT, 13))
            .draw()
            .map_err(msg)?;
        Ok(())
    })
}
