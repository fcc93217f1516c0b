//! What a training run tells its user: a progress bar on stderr ([`Progress`]), a metrics log
//! of one JSON line per optimizer step ([`MetricsLog`]) and a loss-curve PNG
//! ([`write_loss_png`]). Nothing here needs a dependency beyond serde: the PNG is encoded by hand
//! (stored deflate blocks, so no compressor), which keeps plots available on every machine that
//! can train.
//!
//! Step numbering: [`StepRecord::step`] is the 0-based index of the optimizer step, so after a
//! checkpoint taken with `N` steps done, records `0..N` are covered by it, and a resumed run
//! continues at index `N`. Humans see step counts (`step 1/500` after the first step).

use crate::error::{Error, Result};
use crate::tensors_io::write_atomic;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One optimizer step's record.
///
/// Non-finite numbers (a diverged loss is worth logging, not crashing over) are written as the
/// strings `"NaN"`, `"inf"` and `"-inf"`, because JSON has no literal for them and serde_json
/// would otherwise write `null` and then refuse to read it back into an `f64`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// 0-based index of the optimizer step (see the module docs).
    pub step: usize,
    pub epoch: usize,
    #[serde(with = "json_f64")]
    pub loss: f64,
    #[serde(with = "json_f64")]
    pub lr: f64,
    /// Global gradient norm, when the step program computes it.
    #[serde(with = "json_opt_f64", default)]
    pub grad_norm: Option<f64>,
    /// Seconds since the run (this process) started.
    #[serde(with = "json_f64")]
    pub elapsed_s: f64,
}

/// Reads a float written by [`json_f64`]: a number, one of the non-finite strings, or `null`
/// (`None`; what serde_json writes for a non-finite `f64` by default).
struct FloatVisitor;

impl<'de> serde::de::Visitor<'de> for FloatVisitor {
    type Value = Option<f64>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number, null, or one of \"NaN\", \"inf\", \"-inf\"")
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Self::Value, E> {
        Ok(Some(v as f64))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
        match v {
            "NaN" | "nan" => Ok(Some(f64::NAN)),
            "inf" | "+inf" | "Infinity" => Ok(Some(f64::INFINITY)),
            "-inf" | "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
        }
    }
    fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        d: D,
    ) -> std::result::Result<Self::Value, D::Error> {
        d.deserialize_any(FloatVisitor)
    }
}

/// `f64` fields that may be non-finite: numbers as numbers, the rest as strings.
mod json_f64 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    /// `null` reads as NaN: an unknown value, not an error.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(d.deserialize_any(super::FloatVisitor)?.unwrap_or(f64::NAN))
    }
}

/// `Option<f64>` fields: `None` is `null`, `Some` as [`json_f64`].
mod json_opt_f64 {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(x) => super::json_f64::serialize(x, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        d.deserialize_any(super::FloatVisitor)
    }
}

// ---------------------------------------------------------------------------------------------
// Progress bar
// ---------------------------------------------------------------------------------------------

/// Width of the bar between the brackets, in characters.
const BAR_WIDTH: usize = 20;
/// An in-place bar is redrawn at most this often (the last step is always drawn): a fast run
/// should not spend its time writing to the terminal.
const REDRAW_INTERVAL: Duration = Duration::from_millis(100);

/// Progress bar on stderr: `step 120/500 [=======>      ] 24% loss 0.4312 lr 1.0e-3 3.2 steps/s ETA 1m58s`.
///
/// Redraws in place with `'\r'` when stderr is a terminal, otherwise prints a plain line every
/// `max(1, total/20)` steps and at the last step, so CI logs stay short. `quiet` disables it.
/// The speed counts only the steps done by this process since [`Progress::new`] (a resumed run
/// did not do the earlier ones), so create it right before the first step.
pub struct Progress {
    total: usize,
    start_step: usize,
    quiet: bool,
    tty: bool,
    started: Instant,
    /// Plain mode prints when the step count is a multiple of this.
    every: usize,
    last_draw: Option<Instant>,
    /// An in-place bar is on screen without its newline.
    open_line: bool,
}

impl Progress {
    /// `total_steps`: steps of the whole run; `start_step`: steps already done before this
    /// process started (the resumed checkpoint's step, 0 for a fresh run).
    pub fn new(total_steps: usize, start_step: usize, quiet: bool) -> Progress {
        Progress {
            total: total_steps,
            start_step,
            quiet,
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            every: (total_steps / 20).max(1),
            last_draw: None,
            open_line: false,
        }
    }

    /// Reports the step `rec` just finished.
    pub fn update(&mut self, rec: &StepRecord) {
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let done = rec.step + 1;
        let last = done >= self.total;
        if self.tty {
            if !last
                && self
                    .last_draw
                    .is_some_and(|t| now.duration_since(t) < REDRAW_INTERVAL)
            {
                return;
            }
        } else if !plain_line_due(done, self.total, self.every) {
            return;
        }
        self.last_draw = Some(now);
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let (rate, eta) = rate_and_eta(done, self.start_step, self.total, elapsed);
        let line = format_line(done, self.total, rec.loss, rec.lr, rate, eta);
        let mut err = std::io::stderr().lock();
        // A progress bar that cannot be written is not worth failing a training run over.
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
            self.open_line = true;
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    /// Ends an in-place bar with a newline, so what follows starts on its own line.
    pub fn finish(&mut self) {
        if self.open_line {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err);
            let _ = err.flush();
            self.open_line = false;
        }
    }
}

/// Whether plain (non-terminal) mode prints after `done` of `total` steps.
fn plain_line_due(done: usize, total: usize, every: usize) -> bool {
    done >= total || done.is_multiple_of(every.max(1))
}

/// Steps per second over this run's steps (`done - start_step` in `elapsed_s` seconds) and the
/// seconds left at that speed; `None` until there is something to measure.
fn rate_and_eta(
    done: usize,
    start_step: usize,
    total: usize,
    elapsed_s: f64,
) -> (Option<f64>, Option<f64>) {
    let this_run = done.saturating_sub(start_step);
    if this_run == 0 || elapsed_s <= 0.0 || !elapsed_s.is_finite() {
        return (None, None);
    }
    let rate = this_run as f64 / elapsed_s;
    let left = total.saturating_sub(done) as f64;
    (Some(rate), Some(left / rate))
}

/// One progress line (no `'\r'`, no newline). `done` counts steps, `rate` is steps/s, `eta`
/// seconds; either is left out (`ETA --`) when unknown.
fn format_line(
    done: usize,
    total: usize,
    loss: f64,
    lr: f64,
    rate: Option<f64>,
    eta: Option<f64>,
) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = ((frac * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
    let bar = if filled == BAR_WIDTH {
        "=".repeat(BAR_WIDTH)
    } else {
        format!(
            "{}>{}",
            "=".repeat(filled),
            " ".repeat(BAR_WIDTH - filled - 1)
        )
    };
    let pct = (frac * 100.0).floor() as u32;
    let mut line = format!(
        "step {done}/{total} [{bar}] {pct}% loss {} lr {lr:.1e}",
        format_loss(loss)
    );
    if let Some(r) = rate {
        line.push_str(&format!(" {} steps/s", format_rate(r)));
    }
    line.push_str(" ETA ");
    line.push_str(&eta.map_or_else(|| "--".to_string(), format_duration));
    line
}

/// Four decimals in the usual range, scientific notation outside it.
fn format_loss(loss: f64) -> String {
    let a = loss.abs();
    if loss.is_finite() && a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{loss:.3e}")
    } else {
        format!("{loss:.4}")
    }
}

/// Two or three significant digits: `0.25`, `3.2`, `48.1`, `312`.
fn format_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// `45s`, `1m58s`, `2h05m` (seconds rounded; `--` when not finite).
fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--".to_string();
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics log
// ---------------------------------------------------------------------------------------------

/// File name of the metrics log inside the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Metrics log: JSON lines, one [`StepRecord`] per line, at `dir/metrics.jsonl`.
///
/// Crash safety: [`MetricsLog::push`] appends each line with a single plain write (cheap, one
/// syscall per step, and the record is on disk as soon as the step is), and
/// [`MetricsLog::flush`] makes it durable (fsync; call it with each checkpoint). A kill in the
/// middle of a write can leave a torn last line; [`MetricsLog::open`] drops it and rewrites the
/// file atomically, so the file on disk is always whole after `open`. Only a last line may be
/// torn: an unreadable line before it is reported as an error (the file was edited or damaged),
/// not silently discarded.
pub struct MetricsLog {
    path: PathBuf,
    records: Vec<StepRecord>,
    file: File,
    /// A write failed: the file may be short or torn, so the next push or flush rewrites it
    /// (atomically) from the records in memory instead of appending.
    needs_rewrite: bool,
}

impl MetricsLog {
    /// Opens the log; on resume (`resume_from = Some(step)`) keeps only records with
    /// `step < that step` (a killed run may have logged steps after its last checkpoint; they
    /// will be run and logged again) and appends after them. `None` is a fresh run: an existing
    /// log in `dir` is replaced, since mixing two runs' steps in one file would make its curve
    /// meaningless. Creates `dir` if needed.
    pub fn open(dir: &Path, resume_from: Option<usize>) -> Result<MetricsLog> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(METRICS_FILE);
        let records = match resume_from {
            None => Vec::new(),
            Some(from) => {
                let bytes = match std::fs::read(&path) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(Error::io(&path, e)),
                };
                let mut recs = parse_log(&path, &bytes)?;
                recs.retain(|r| r.step < from);
                recs
            }
        };
        write_atomic(&path, &serialize_log(&records)?)?;
        let file = open_append(&path)?;
        Ok(MetricsLog {
            path,
            records,
            file,
            needs_rewrite: false,
        })
    }

    /// All records of the run so far (on resume including those kept from before).
    pub fn records(&self) -> &[StepRecord] {
        &self.records
    }

    /// Where the log is written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record: kept in memory and written through to the file (one append; see the
    /// type's docs for what a crash can leave behind).
    pub fn push(&mut self, rec: StepRecord) -> Result<()> {
        let mut line = record_line(&rec)?;
        line.push(b'\n');
        self.records.push(rec);
        if self.needs_rewrite {
            return self.rewrite();
        }
        if let Err(e) = self.file.write_all(&line) {
            self.needs_rewrite = true;
            return Err(Error::io(&self.path, e));
        }
        Ok(())
    }

    /// Makes every pushed record durable (fsync), or rewrites the file atomically from memory
    /// if an earlier write failed.
    pub fn flush(&mut self) -> Result<()> {
        if self.needs_rewrite {
            return self.rewrite();
        }
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }

    fn rewrite(&mut self) -> Result<()> {
        write_atomic(&self.path, &serialize_log(&self.records)?)?;
        self.file = open_append(&self.path)?;
        self.needs_rewrite = false;
        Ok(())
    }
}

fn open_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn record_line(rec: &StepRecord) -> Result<Vec<u8>> {
    serde_json::to_vec(rec)
        .map_err(|e| Error::Input(format!("cannot serialize metrics record: {e}")))
}

fn serialize_log(records: &[StepRecord]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(records.len() * 96);
    for r in records {
        out.extend_from_slice(&record_line(r)?);
        out.push(b'\n');
    }
    Ok(out)
}

/// Parses a metrics log. A last line without its newline was being written when the run died:
/// it is kept if it parses (only the newline was lost) and dropped otherwise.
fn parse_log(path: &Path, bytes: &[u8]) -> Result<Vec<StepRecord>> {
    let blank = |l: &[u8]| l.iter().all(u8::is_ascii_whitespace);
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let (body, tail) = bytes.split_at(complete);
    let mut out = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if blank(line) {
            continue;
        }
        let rec = serde_json::from_slice(line).map_err(|e| {
            Error::Input(format!(
                "{}:{}: not a metrics record ({e}); fix or delete the file",
                path.display(),
                i + 1
            ))
        })?;
        out.push(rec);
    }
    if !blank(tail) {
        if let Ok(rec) = serde_json::from_slice(tail) {
            out.push(rec);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Loss-curve PNG
// ---------------------------------------------------------------------------------------------

const GRID: [u8; 3] = [232, 232, 232];
const INK: [u8; 3] = [60, 60, 60];
/// The raw curve alone.
const RAW: [u8; 3] = [31, 119, 180];
/// The raw curve under a smoothed one: lighter, so the trend stands out.
const RAW_FAINT: [u8; 3] = [158, 193, 228];
const SMOOTH: [u8; 3] = [230, 85, 13];
/// With more finite points than this the smoothed curve is drawn too.
const SMOOTH_MIN_POINTS: usize = 20;
/// The y axis turns logarithmic when max/min loss exceeds this.
const LOG_RATIO: f64 = 100.0;
const MIN_SIDE: u32 = 64;
const MIN_HEIGHT: u32 = 48;
const MAX_SIDE: u32 = 8192;

/// Writes a loss-curve PNG of `width` x `height` pixels (640x400 is a good size): white
/// background, left and bottom axes with tick marks and light grid lines, the loss per step as a
/// polyline and, with more than 20 points, an exponential moving average (debiased, smoothed in
/// the plotted scale) in a second colour. The y axis spans the finite losses with a 5% margin and
/// is logarithmic when max/min > 100 (all positive); the x axis spans the steps. The data min
/// and max loss and the first and last step are labelled in a built-in 3x5 pixel font.
/// Non-finite losses leave gaps in the curves. The file is written atomically.
pub fn write_loss_png(path: &Path, records: &[StepRecord], width: u32, height: u32) -> Result<()> {
    if !(MIN_SIDE..=MAX_SIDE).contains(&width) || !(MIN_HEIGHT..=MAX_SIDE).contains(&height) {
        return Err(Error::Input(format!(
            "{}: loss plot size {width}x{height} out of range \
             (width {MIN_SIDE}..={MAX_SIDE}, height {MIN_HEIGHT}..={MAX_SIDE})",
            path.display()
        )));
    }
    let canvas = render_loss_plot(records, width as usize, height as usize);
    write_atomic(path, &encode_png(width, height, &canvas.px))
}

/// An RGB image, row-major, top row first.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    /// A white canvas.
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if x >= 0 && y >= 0 && (x as usize) < self.w && (y as usize) < self.h {
            let i = (y as usize * self.w + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    #[cfg(test)]
    fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.w + x) * 3;
        [self.px[i], self.px[i + 1], self.px[i + 2]]
    }

    fn hline(&mut self, x0: i64, x1: i64, y: i64, c: [u8; 3]) {
        for x in x0.min(x1)..=x0.max(x1) {
            self.set(x, y, c);
        }
    }

    fn vline(&mut self, x: i64, y0: i64, y1: i64, c: [u8; 3]) {
        for y in y0.min(y1)..=y0.max(y1) {
            self.set(x, y, c);
        }
    }

    /// Bresenham line; `thick` 2 adds a pixel below and right of each one.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3], thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for oy in 0..thick {
                for ox in 0..thick {
                    self.set(x + ox, y + oy, c);
                }
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Draws `s` with its top-left corner at (x, y); unknown characters are blank.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let rows = glyph(ch);
            let gx = x + i as i64 * 4 * scale;
            for (r, bits) in rows.iter().enumerate() {
                for col in 0..3 {
                    if bits & (0b100 >> col) != 0 {
                        for oy in 0..scale {
                            for ox in 0..scale {
                                self.set(gx + col * scale + ox, y + r as i64 * scale + oy, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 3x5 glyphs, one row per entry (top first), bit 2 = left column.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [0b111, 0b101, 0b101, 0b101, 0b111],
        '1' => [0b010, 0b110, 0b010, 0b010, 0b111],
        '2' => [0b111, 0b001, 0b111, 0b100, 0b111],
        '3' => [0b111, 0b001, 0b111, 0b001, 0b111],
        '4' => [0b101, 0b101, 0b111, 0b001, 0b001],
        '5' => [0b111, 0b100, 0b111, 0b001, 0b111],
        '6' => [0b111, 0b100, 0b111, 0b101, 0b111],
        '7' => [0b111, 0b001, 0b001, 0b001, 0b001],
        '8' => [0b111, 0b101, 0b111, 0b101, 0b111],
        '9' => [0b111, 0b101, 0b111, 0b001, 0b111],
        '.' => [0b000, 0b000, 0b000, 0b000, 0b010],
        '-' => [0b000, 0b000, 0b111, 0b000, 0b000],
        'e' => [0b000, 0b010, 0b111, 0b100, 0b011],
        _ => [0; 5],
    }
}

/// Pixel width of `s` in the 3x5 font (one blank column between characters).
fn text_width(s: &str, scale: i64) -> i64 {
    let n = s.chars().count() as i64;
    if n == 0 {
        0
    } else {
        n * 4 * scale - scale
    }
}

/// A compact label with three significant digits: `0.412`, `2.31`, `1234`, `1.2e-5`.
fn format_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&a) {
        let s = format!("{v:.2e}");
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        return format!("{}e{exp}", trim_zeros(mant));
    }
    if a >= 100.0 {
        return format!("{v:.0}");
    }
    let decimals = (2 - a.log10().floor() as i64).max(0) as usize;
    trim_zeros(&format!("{v:.decimals$}")).to_string()
}

fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

/// About `target` round tick values (1, 2 or 5 times a power of ten apart) in `[lo, hi]`;
/// with `integer`, never closer than 1.
fn nice_ticks(lo: f64, hi: f64, target: usize, integer: bool) -> Vec<f64> {
    let span = hi - lo;
    if !span.is_finite() || span <= 0.0 {
        return Vec::new();
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let mut step = mag
        * if norm < 1.5 {
            1.0
        } else if norm < 3.0 {
            2.0
        } else if norm < 7.0 {
            5.0
        } else {
            10.0
        };
    if integer {
        step = step.max(1.0);
    }
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).take(200).map(|k| k as f64 * step).collect()
}

/// Maps steps and plotted loss values (log10 on a log axis) into the plot rectangle.
struct Axes {
    left: i64,
    right: i64,
    top: i64,
    bottom: i64,
    x_lo: f64,
    x_hi: f64,
    y_lo: f64,
    y_hi: f64,
}

impl Axes {
    fn px(&self, step: f64) -> i64 {
        let f = (step - self.x_lo) / (self.x_hi - self.x_lo);
        self.left + (f * (self.right - self.left) as f64).round() as i64
    }
    /// Pixel row of a plotted value.
    fn py(&self, t: f64) -> i64 {
        let f = (t - self.y_lo) / (self.y_hi - self.y_lo);
        self.bottom - (f * (self.bottom - self.top) as f64).round() as i64
    }
}

/// Debiased exponential moving average over the finite values (non-finite stay non-finite and
/// do not disturb the average). The horizon grows with the number of points so that the curve
/// looks equally smooth at any run length (about n/40 steps, so the curve trails a falling
/// loss by about that much: the price of a one-sided average that matches what other tools show).
fn ema(values: &[f64]) -> Vec<f64> {
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

/// Draws a polyline through `(step, plotted value)` points, broken at non-finite values.
fn polyline(canvas: &mut Canvas, axes: &Axes, pts: &[(f64, f64)], c: [u8; 3], thick: i64) {
    let mut prev: Option<(i64, i64)> = None;
    for &(x, t) in pts {
        if !t.is_finite() {
            prev = None;
            continue;
        }
        let p = (axes.px(x), axes.py(t));
        canvas.line(prev.unwrap_or(p), p, c, thick);
        prev = Some(p);
    }
}

fn render_loss_plot(records: &[StepRecord], w: usize, h: usize) -> Canvas {
    let mut canvas = Canvas::new(w, h);
    let scale: i64 = if w >= 400 && h >= 300 { 2 } else { 1 };
    let glyph_h = 5 * scale;
    let tick = 3 * scale;

    let mut recs: Vec<&StepRecord> = records.iter().collect();
    recs.sort_by_key(|r| r.step);
    let finite: Vec<f64> = recs
        .iter()
        .map(|r| r.loss)
        .filter(|l| l.is_finite())
        .collect();
    let data_range = finite.iter().fold(None, |acc: Option<(f64, f64)>, &l| {
        Some(acc.map_or((l, l), |(lo, hi)| (lo.min(l), hi.max(l))))
    });
    let log = data_range.is_some_and(|(lo, hi)| lo > 0.0 && hi / lo > LOG_RATIO);
    // With a log axis, non-positive losses cannot be placed; the range check above makes them
    // impossible (lo > 0), so every finite loss maps to a finite value.
    let t = |l: f64| if log { l.log10() } else { l };
    let (y_lo, y_hi) = match data_range {
        None => (0.0, 1.0),
        Some((lo, hi)) => {
            let (a, b) = (t(lo), t(hi));
            let pad = if b > a {
                (b - a) * 0.05
            } else if a != 0.0 {
                a.abs() * 0.1
            } else {
                1.0
            };
            (a - pad, b + pad)
        }
    };
    let (x_lo, x_hi) = match (recs.first(), recs.last()) {
        (Some(f), Some(l)) if l.step > f.step => (f.step as f64, l.step as f64),
        (Some(f), _) => (f.step as f64 - 1.0, f.step as f64 + 1.0),
        _ => (0.0, 1.0),
    };

    // Labels first: their sizes decide the margins.
    let y_labels: Vec<(f64, String)> = match data_range {
        Some((lo, hi)) if format_label(lo) != format_label(hi) => {
            vec![(t(lo), format_label(lo)), (t(hi), format_label(hi))]
        }
        Some((lo, _)) => vec![(t(lo), format_label(lo))],
        None => Vec::new(),
    };
    let x_labels: Vec<String> = match (recs.first(), recs.last()) {
        (Some(f), Some(l)) if l.step > f.step => vec![f.step.to_string(), l.step.to_string()],
        (Some(f), _) => vec![f.step.to_string()],
        _ => Vec::new(),
    };
    let label_w = y_labels
        .iter()
        .map(|(_, s)| text_width(s, scale))
        .max()
        .unwrap_or(0);
    let axes = Axes {
        left: label_w + tick + 4 * scale + 2,
        right: w as i64 - 6 * scale - 2,
        top: glyph_h / 2 + 4 * scale,
        bottom: h as i64 - (glyph_h + tick + 4 * scale + 2),
        x_lo,
        x_hi,
        y_lo,
        y_hi,
    };

    // Grid lines and tick marks.
    let mut y_ticks: Vec<(f64, bool)> = Vec::new();
    if log {
        let (d0, d1) = (y_lo.ceil() as i64, y_hi.floor() as i64);
        for d in (y_lo.floor() as i64)..=d1 {
            if d >= d0 {
                y_ticks.push((d as f64, true));
            }
            if d1 - d0 <= 6 {
                for k in 2..10 {
                    let v = d as f64 + (k as f64).log10();
                    if v > y_lo && v < y_hi {
                        y_ticks.push((v, false));
                    }
                }
            }
        }
    } else {
        y_ticks = nice_ticks(y_lo, y_hi, 5, false)
            .into_iter()
            .map(|v| (v, true))
            .collect();
    }
    let x_ticks = nice_ticks(x_lo, x_hi, 6, true);
    for &(v, major) in &y_ticks {
        let y = axes.py(v);
        if major {
            canvas.hline(axes.left + 1, axes.right, y, GRID);
        }
        let len = if major { tick } else { tick / 2 + 1 };
        canvas.hline(axes.left - len, axes.left - 1, y, INK);
    }
    for &v in &x_ticks {
        let x = axes.px(v);
        canvas.vline(x, axes.top, axes.bottom - 1, GRID);
        canvas.vline(x, axes.bottom + 1, axes.bottom + tick, INK);
    }

    // Curves.
    let pts: Vec<(f64, f64)> = recs
        .iter()
        .map(|r| {
            (
                r.step as f64,
                if r.loss.is_finite() {
                    t(r.loss)
                } else {
                    f64::NAN
                },
            )
        })
        .collect();
    let smooth = finite.len() > SMOOTH_MIN_POINTS;
    polyline(
        &mut canvas,
        &axes,
        &pts,
        if smooth { RAW_FAINT } else { RAW },
        1,
    );
    if smooth {
        let ys: Vec<f64> = pts.iter().map(|p| p.1).collect();
        let sm: Vec<(f64, f64)> = pts.iter().map(|p| p.0).zip(ema(&ys)).collect();
        polyline(&mut canvas, &axes, &sm, SMOOTH, 2);
    }

    // Axes on top, then the labels with their own ticks.
    canvas.vline(axes.left, axes.top, axes.bottom, INK);
    canvas.hline(axes.left, axes.right, axes.bottom, INK);
    for (v, s) in &y_labels {
        let y = axes.py(*v);
        canvas.hline(axes.left - tick, axes.left - 1, y, INK);
        let x = axes.left - tick - 2 * scale - text_width(s, scale);
        canvas.text(x, y - glyph_h / 2, s, scale, INK);
    }
    let label_y = axes.bottom + tick + 2 * scale;
    let first_w = x_labels.first().map_or(0, |s| text_width(s, scale));
    for (i, s) in x_labels.iter().enumerate() {
        let tw = text_width(s, scale);
        let x = if i == 0 {
            if x_labels.len() == 1 {
                axes.px((x_lo + x_hi) / 2.0) - tw / 2
            } else {
                axes.left
            }
        } else {
            axes.right - tw
        };
        // The last label yields to the first when the plot is too narrow for both.
        if i > 0 && x < axes.left + first_w + 3 * scale {
            continue;
        }
        canvas.text(x, label_y, s, scale, INK);
    }
    canvas
}

// PNG encoding: signature, IHDR (8-bit RGB), one IDAT holding a zlib stream of stored deflate
// blocks, IEND. Unfiltered scanlines; a plot is small enough that compressing is not worth code.

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
/// Largest payload of one stored deflate block.
const STORED_MAX: usize = 65535;

fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    let row = width as usize * 3;
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in rgb.chunks_exact(row) {
        raw.push(0); // filter type None
        raw.extend_from_slice(line);
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let idat = zlib_stored(&raw);
    let mut out = Vec::with_capacity(idat.len() + 64);
    out.extend_from_slice(&PNG_SIGNATURE);
    push_chunk(&mut out, b"IHDR", &ihdr);
    push_chunk(&mut out, b"IDAT", &idat);
    push_chunk(&mut out, b"IEND", &[]);
    out
}

/// Length, type, data, CRC32 of type and data.
fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

/// A zlib stream (RFC 1950) of stored deflate blocks (RFC 1951, BTYPE 00).
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let blocks = data.len().div_ceil(STORED_MAX).max(1);
    let mut out = Vec::with_capacity(data.len() + blocks * 5 + 6);
    // CMF: deflate, 32 KiB window; FLG: no dictionary, fastest level, check bits so that
    // (CMF * 256 + FLG) % 31 == 0.
    out.extend_from_slice(&[0x78, 0x01]);
    let mut chunks: Vec<&[u8]> = data.chunks(STORED_MAX).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        // BFINAL in bit 0, BTYPE 00; the rest of the byte is padding to the byte boundary.
        out.push(u8::from(i == last));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 bytes is the most that cannot overflow u32 before the modulo.
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

const CRC_TABLE: [u32; 256] = crc_table();

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
}

/// CRC-32 (ISO 3309, as PNG uses it).
fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    c ^ 0xFFFF_FFFF
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "dorac-report-{}-{name}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn rec(step: usize, loss: f64) -> StepRecord {
        StepRecord {
            step,
            epoch: step / 10,
            loss,
            lr: 1e-3,
            grad_norm: if step.is_multiple_of(2) {
                Some(0.5 + step as f64)
            } else {
                None
            },
            elapsed_s: step as f64 * 0.25,
        }
    }

    /// A decaying noisy loss curve (deterministic xorshift noise).
    fn synthetic(n: usize) -> Vec<StepRecord> {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let noise = (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let clean = 2.3 * (-(i as f64) / 120.0).exp() + 0.35;
                rec(i, clean * (1.0 + 0.35 * noise))
            })
            .collect()
    }

    // --- progress -------------------------------------------------------------------------

    #[test]
    fn format_line_matches_the_documented_shape() {
        let line = format_line(120, 500, 0.43118, 1e-3, Some(3.2), Some(118.0));
        assert_eq!(
            line,
            "step 120/500 [====>               ] 24% loss 0.4312 lr 1.0e-3 3.2 steps/s ETA 1m58s"
        );
        let start = format_line(0, 500, 2.5, 2e-4, None, None);
        assert_eq!(
            start,
            "step 0/500 [>                   ] 0% loss 2.5000 lr 2.0e-4 ETA --"
        );
        let end = format_line(500, 500, 0.1, 1e-3, Some(12.34), Some(0.0));
        assert!(
            end.starts_with("step 500/500 [====================] 100% loss 0.1000"),
            "{end}"
        );
        assert!(end.ends_with("12.3 steps/s ETA 0s"), "{end}");
        // Nothing divides by zero.
        let empty = format_line(0, 0, f64::NAN, 0.0, None, None);
        assert!(empty.contains("100% loss NaN"), "{empty}");
    }

    #[test]
    fn number_formats() {
        assert_eq!(format_duration(0.4), "0s");
        assert_eq!(format_duration(45.0), "45s");
        assert_eq!(format_duration(59.6), "1m00s");
        assert_eq!(format_duration(118.0), "1m58s");
        assert_eq!(format_duration(3600.0 * 2.0 + 5.0 * 60.0 + 12.0), "2h05m");
        assert_eq!(format_duration(f64::INFINITY), "--");
        assert_eq!(format_rate(0.25), "0.25");
        assert_eq!(format_rate(3.21), "3.2");
        assert_eq!(format_rate(312.4), "312");
        assert_eq!(format_loss(1.5e-5), "1.500e-5");
        assert_eq!(format_loss(12345.0), "1.234e4");
        assert_eq!(format_loss(0.0), "0.0000");
    }

    #[test]
    fn rate_counts_only_this_runs_steps() {
        // Resumed at 100, 150 done: 50 steps in 10 s is 5 steps/s, 350 left is 70 s.
        let (rate, eta) = rate_and_eta(150, 100, 500, 10.0);
        assert_eq!(rate, Some(5.0));
        assert_eq!(eta, Some(70.0));
        assert_eq!(rate_and_eta(100, 100, 500, 3.0), (None, None));
        assert_eq!(rate_and_eta(1, 0, 500, 0.0), (None, None));
        assert_eq!(rate_and_eta(500, 0, 500, 50.0), (Some(10.0), Some(0.0)));
    }

    #[test]
    fn plain_mode_prints_every_twentieth_and_the_last() {
        let total = 500;
        let every = (total / 20).max(1);
        let printed: Vec<usize> = (1..=total)
            .filter(|&d| plain_line_due(d, total, every))
            .collect();
        assert_eq!(printed.len(), 20);
        assert_eq!(printed[0], 25);
        assert_eq!(*printed.last().unwrap(), 500);
        // Short runs print every step; a total not divisible still ends with the last.
        assert!((1..=7).all(|d| plain_line_due(d, 7, 1)));
        assert!(plain_line_due(41, 41, 2));
        assert!(!plain_line_due(41, 41 + 1, 2));
    }

    #[test]
    fn quiet_progress_is_silent_and_finish_is_idempotent() {
        let mut p = Progress::new(10, 0, true);
        for r in synthetic(10) {
            p.update(&r);
        }
        p.finish();
        p.finish();
        assert!(!p.open_line);
    }

    // --- metrics log ----------------------------------------------------------------------

    #[test]
    fn records_round_trip_including_non_finite_values() {
        let mut r = rec(3, f64::NAN);
        r.grad_norm = Some(f64::INFINITY);
        r.lr = f64::NEG_INFINITY;
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains(r#""loss":"NaN""#), "{line}");
        let back: StepRecord = serde_json::from_str(&line).unwrap();
        assert!(back.loss.is_nan());
        assert_eq!(back.grad_norm, Some(f64::INFINITY));
        assert_eq!(back.lr, f64::NEG_INFINITY);
        // null (serde_json's default for non-finite) reads as NaN; a missing grad_norm as None;
        // integers are numbers too.
        let r2: StepRecord =
            serde_json::from_str(r#"{"step":1,"epoch":0,"loss":null,"lr":1,"elapsed_s":0.5}"#)
                .unwrap();
        assert!(r2.loss.is_nan());
        assert_eq!(r2.lr, 1.0);
        assert_eq!(r2.grad_norm, None);
        let fine = rec(4, 0.25);
        let back: StepRecord =
            serde_json::from_str(&serde_json::to_string(&fine).unwrap()).unwrap();
        assert_eq!(back, fine);
        assert!(serde_json::from_str::<StepRecord>(
            r#"{"step":1,"epoch":0,"loss":"lots","lr":1,"elapsed_s":0.5}"#
        )
        .is_err());
    }

    #[test]
    fn log_writes_reopens_and_truncates_on_resume() {
        let dir = TempDir::new("resume");
        let mut log = MetricsLog::open(&dir.0, None).unwrap();
        for r in synthetic(10) {
            log.push(r).unwrap();
        }
        log.flush().unwrap();
        assert_eq!(log.records().len(), 10);
        let text = std::fs::read_to_string(dir.0.join(METRICS_FILE)).unwrap();
        assert_eq!(text.lines().count(), 10);
        assert!(text.ends_with('\n'));
        drop(log);

        // Everything survives a resume past the end.
        let log = MetricsLog::open(&dir.0, Some(100)).unwrap();
        assert_eq!(log.records(), &synthetic(10)[..]);
        drop(log);

        // Resuming from the checkpoint at 6 steps drops the steps logged after it, in memory
        // and on disk, and appends after the rest.
        let mut log = MetricsLog::open(&dir.0, Some(6)).unwrap();
        assert_eq!(log.records(), &synthetic(6)[..]);
        assert_eq!(
            std::fs::read_to_string(log.path()).unwrap().lines().count(),
            6
        );
        log.push(rec(6, 9.0)).unwrap();
        log.flush().unwrap();
        drop(log);
        let log = MetricsLog::open(&dir.0, Some(1000)).unwrap();
        assert_eq!(log.records().len(), 7);
        assert_eq!(log.records()[6], rec(6, 9.0));
        drop(log);

        // A fresh run replaces the old log.
        let log = MetricsLog::open(&dir.0, None).unwrap();
        assert!(log.records().is_empty());
        assert_eq!(std::fs::read(log.path()).unwrap().len(), 0);
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![METRICS_FILE.to_string()]);
    }

    #[test]
    fn resume_without_a_log_starts_empty_and_creates_the_folder() {
        let dir = TempDir::new("nolog");
        let sub = dir.0.join("out/run");
        let log = MetricsLog::open(&sub, Some(40)).unwrap();
        assert!(log.records().is_empty());
        assert!(sub.join(METRICS_FILE).is_file());
    }

    #[test]
    fn torn_last_line_is_dropped_and_the_file_repaired() {
        let dir = TempDir::new("torn");
        let path = dir.0.join(METRICS_FILE);
        let mut log = MetricsLog::open(&dir.0, None).unwrap();
        for r in synthetic(5) {
            log.push(r).unwrap();
        }
        drop(log);
        // A run killed in the middle of writing step 5.
        let full = serde_json::to_string(&rec(5, 0.5)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&full.as_bytes()[..full.len() / 2]).unwrap();
        drop(f);

        let mut log = MetricsLog::open(&dir.0, Some(10)).unwrap();
        assert_eq!(log.records(), &synthetic(5)[..]);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 5);
        assert!(text.ends_with('\n'));
        log.push(rec(5, 0.5)).unwrap();
        drop(log);
        let log = MetricsLog::open(&dir.0, Some(10)).unwrap();
        assert_eq!(log.records().len(), 6);
        drop(log);

        // A whole last record that only lost its newline is kept.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(serde_json::to_string(&rec(6, 0.4)).unwrap().as_bytes())
            .unwrap();
        drop(f);
        let mut log = MetricsLog::open(&dir.0, Some(10)).unwrap();
        assert_eq!(log.records().len(), 7);
        log.push(rec(7, 0.3)).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 8, "{text}");
    }

    #[test]
    fn damaged_line_before_the_end_is_an_error_naming_it() {
        let dir = TempDir::new("damaged");
        let path = dir.0.join(METRICS_FILE);
        let good = serde_json::to_string(&rec(0, 1.0)).unwrap();
        std::fs::write(&path, format!("{good}\n{{garbage\n{good}\n")).unwrap();
        let err = MetricsLog::open(&dir.0, Some(10))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("metrics.jsonl:2:"), "{err}");
        // Blank lines are fine.
        std::fs::write(&path, format!("{good}\n\n{good}\n")).unwrap();
        assert_eq!(
            MetricsLog::open(&dir.0, Some(10)).unwrap().records().len(),
            2
        );
    }

    // --- PNG ------------------------------------------------------------------------------

    struct Decoded {
        width: u32,
        height: u32,
        rgb: Vec<u8>,
    }

    /// A strict reader for exactly what `encode_png` writes: checks the signature, every
    /// chunk's CRC, IHDR, the zlib header and adler32, each stored block's LEN/NLEN, the
    /// scanline count and the filter bytes.
    fn decode_png(bytes: &[u8]) -> Decoded {
        assert_eq!(&bytes[..8], &PNG_SIGNATURE);
        let mut pos = 8;
        let mut chunks: Vec<([u8; 4], &[u8])> = Vec::new();
        while pos < bytes.len() {
            let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
            let kind: [u8; 4] = bytes[pos + 4..pos + 8].try_into().unwrap();
            let data = &bytes[pos + 8..pos + 8 + len];
            let crc = u32::from_be_bytes(bytes[pos + 8 + len..pos + 12 + len].try_into().unwrap());
            assert_eq!(
                crc,
                crc32(&bytes[pos + 4..pos + 8 + len]),
                "CRC of {kind:?}"
            );
            chunks.push((kind, data));
            pos += 12 + len;
        }
        assert_eq!(pos, bytes.len());
        assert_eq!(&chunks[0].0, b"IHDR");
        assert_eq!(&chunks.last().unwrap().0, b"IEND");
        assert!(chunks.last().unwrap().1.is_empty());
        let ihdr = chunks[0].1;
        assert_eq!(ihdr.len(), 13);
        let width = u32::from_be_bytes(ihdr[0..4].try_into().unwrap());
        let height = u32::from_be_bytes(ihdr[4..8].try_into().unwrap());
        assert_eq!(&ihdr[8..], &[8, 2, 0, 0, 0], "8-bit RGB, no interlace");

        let z: Vec<u8> = chunks
            .iter()
            .filter(|c| &c.0 == b"IDAT")
            .flat_map(|c| c.1.iter().copied())
            .collect();
        let (cmf, flg) = (z[0], z[1]);
        assert_eq!(cmf & 0x0F, 8, "deflate");
        assert!(cmf >> 4 <= 7, "window");
        assert_eq!((u16::from(cmf) * 256 + u16::from(flg)) % 31, 0, "FCHECK");
        assert_eq!(flg & 0x20, 0, "no preset dictionary");
        let mut p = 2;
        let mut raw = Vec::new();
        loop {
            let header = z[p];
            assert_eq!(header >> 1, 0, "stored block, padded header byte");
            let len = u16::from_le_bytes([z[p + 1], z[p + 2]]);
            let nlen = u16::from_le_bytes([z[p + 3], z[p + 4]]);
            assert_eq!(len, !nlen);
            raw.extend_from_slice(&z[p + 5..p + 5 + len as usize]);
            p += 5 + len as usize;
            if header & 1 == 1 {
                break;
            }
            assert_eq!(len as usize, STORED_MAX, "only the last block is short");
        }
        assert_eq!(z.len(), p + 4, "adler32 ends the stream");
        assert_eq!(
            u32::from_be_bytes(z[p..p + 4].try_into().unwrap()),
            adler32(&raw)
        );

        let row = width as usize * 3 + 1;
        assert_eq!(raw.len(), row * height as usize, "scanline count");
        let mut rgb = Vec::with_capacity(raw.len());
        for line in raw.chunks(row) {
            assert_eq!(line[0], 0, "filter byte");
            rgb.extend_from_slice(&line[1..]);
        }
        Decoded { width, height, rgb }
    }

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"IEND"), 0xAE42_6082);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11E6_0398);
        assert_eq!(adler32(&[]), 1);
        // Large input exercises the deferred modulo.
        let big = vec![0xFFu8; 100_000];
        let (mut a, mut b) = (1u64, 0u64);
        for &x in &big {
            a = (a + u64::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!(adler32(&big), ((b << 16) | a) as u32);
    }

    #[test]
    fn zlib_stream_of_empty_and_multi_block_data() {
        let empty = zlib_stored(&[]);
        assert_eq!(empty, vec![0x78, 0x01, 1, 0, 0, 0xFF, 0xFF, 0, 0, 0, 1]);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let z = zlib_stored(&data);
        assert_eq!(z.len(), 2 + data.len() + 4 * 5 + 4); // four blocks
        let png = encode_png(1, 1, &[1, 2, 3]);
        assert_eq!(decode_png(&png).rgb, vec![1, 2, 3]);
    }

    #[test]
    fn loss_png_decodes_and_shows_both_curves() {
        let dir = TempDir::new("png");
        let path = dir.0.join("loss.png");
        write_loss_png(&path, &synthetic(500), 640, 400).unwrap();
        let img = decode_png(&std::fs::read(&path).unwrap());
        assert_eq!((img.width, img.height), (640, 400));
        assert_eq!(img.rgb.len(), 640 * 400 * 3);
        let count = |c: [u8; 3]| img.rgb.chunks(3).filter(|p| *p == c).count();
        assert_eq!(&img.rgb[..3], &[255, 255, 255], "white background");
        assert!(count(RAW_FAINT) > 500, "raw curve");
        assert!(count(SMOOTH) > 1000, "smoothed curve");
        assert!(count(INK) > 1000, "axes, ticks and labels");
        // The smoothed curve descends: its pixels on the left sit higher than on the right.
        let canvas = Canvas {
            w: 640,
            h: 400,
            px: img.rgb,
        };
        let smooth_row = |x: usize| (0..400).find(|&y| canvas.get(x, y) == SMOOTH);
        let (l, r) = (smooth_row(100).unwrap(), smooth_row(600).unwrap());
        assert!(l < r, "left {l} right {r}");
    }

    #[test]
    fn loss_png_edge_cases() {
        let dir = TempDir::new("png-edge");
        let path = dir.0.join("edge.png");
        let cases: Vec<Vec<StepRecord>> = vec![
            Vec::new(),
            vec![rec(0, 1.0)],
            vec![rec(3, 0.5), rec(4, 0.5)],
            vec![rec(0, f64::NAN), rec(1, f64::INFINITY)],
            vec![rec(0, 0.0), rec(1, -1.0), rec(2, 1.0)],
            // Out of order and with a gap (NaN): still one image.
            vec![rec(5, 1.0), rec(1, 3.0), rec(3, f64::NAN), rec(2, 2.0)],
        ];
        for (i, recs) in cases.iter().enumerate() {
            write_loss_png(&path, recs, 200, 120).unwrap();
            let img = decode_png(&std::fs::read(&path).unwrap());
            assert_eq!((img.width, img.height), (200, 120), "case {i}");
        }
        // The smallest allowed size still draws.
        write_loss_png(&path, &synthetic(50), MIN_SIDE, MIN_HEIGHT).unwrap();
        decode_png(&std::fs::read(&path).unwrap());
        assert!(write_loss_png(&path, &synthetic(5), 10, 10).is_err());
        assert!(write_loss_png(&path, &synthetic(5), 640, 100_000).is_err());
    }

    #[test]
    fn log_scale_spreads_decades_evenly() {
        // Loss from 1000 down to 0.01: log axis, so the decade 1000..100 and the decade
        // 0.1..0.01 are equally tall.
        let recs: Vec<StepRecord> = (0..=50)
            .map(|i| rec(i, 10f64.powf(3.0 - i as f64 / 10.0)))
            .collect();
        let canvas = render_loss_plot(&recs, 400, 300);
        let first_row = |x: i64| {
            (0..300)
                .find(|&y| [RAW, RAW_FAINT, SMOOTH].contains(&canvas.get(x as usize, y)))
                .map(|y| y as i64)
        };
        // Raw curve is a straight line on the log axis: sample its rows at three x positions
        // equally spaced and check the middle row is halfway.
        let xs = [120i64, 240, 360];
        let rows: Vec<i64> = xs.iter().map(|&x| first_row(x).unwrap()).collect();
        assert!((rows[0] + rows[2] - 2 * rows[1]).abs() <= 4, "{rows:?}");
    }

    #[test]
    fn labels_and_ticks() {
        assert_eq!(format_label(0.0), "0");
        assert_eq!(format_label(0.41234), "0.412");
        assert_eq!(format_label(2.3099), "2.31");
        assert_eq!(format_label(2.0), "2");
        assert_eq!(format_label(12.34), "12.3");
        assert_eq!(format_label(1234.4), "1234");
        assert_eq!(format_label(1.2e-5), "1.2e-5");
        assert_eq!(format_label(-0.05), "-0.05");
        assert_eq!(format_label(3e7), "3e7");
        assert_eq!(
            nice_ticks(0.0, 10.0, 5, false),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
        );
        assert_eq!(nice_ticks(0.0, 3.0, 6, true), vec![0.0, 1.0, 2.0, 3.0]);
        let t = nice_ticks(0.31, 2.74, 5, false);
        assert_eq!(t.len(), 5, "{t:?}");
        assert!((t[0] - 0.5).abs() < 1e-12);
        assert!(nice_ticks(1.0, 1.0, 5, false).is_empty());
        assert_eq!(text_width("1.5", 2), 22);
        // Every character a label can contain has a glyph.
        for c in "0123456789.-e".chars() {
            assert_ne!(glyph(c), [0; 5], "{c}");
        }
    }

    /// Writes `$DORAC_LOSS_PNG` (e.g. /tmp/loss_test.png) for a look at the plot.
    #[test]
    fn write_sample_png_when_asked() {
        if let Ok(p) = std::env::var("DORAC_LOSS_PNG") {
            write_loss_png(Path::new(&p), &synthetic(500), 640, 400).unwrap();
        }
    }
}
