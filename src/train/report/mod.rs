//! What a training run tells its user: a progress bar on stderr ([`Progress`]), a metrics log of
//! one JSON line per optimizer step ([`MetricsLog`], of [`StepRecord`]s) and the loss curve
//! ([`write_loss_png`], drawn by [`crate::plot`]).
//!
//! Step numbering: [`StepRecord::step`] is the 0-based index of the optimizer step, so after a
//! checkpoint taken with `N` steps done, records `0..N` are covered by it, and a resumed run
//! continues at index `N`. Humans see step counts (`step 1/500` after the first step).

mod metrics;
mod progress;
mod record;

pub use metrics::{read_log, MetricsLog, METRICS_FILE};
pub use progress::{format_eval, format_loss, Progress};
pub use record::StepRecord;

use crate::error::Result;
use crate::plot::{loss_curve, LossCurve};
use std::path::Path;

/// Writes the loss curve of `records` (training loss per step; eval loss and accuracy where
/// evaluations ran) to `path` as a `width` x `height` PNG, atomically.
pub fn write_loss_png(path: &Path, records: &[StepRecord], width: u32, height: u32) -> Result<()> {
    let x = |r: &StepRecord| (r.step + 1) as f64;
    let train: Vec<(f64, f64)> = records.iter().map(|r| (x(r), r.loss)).collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| Some((x(r), r.eval_loss?)))
        .collect();
    let accuracy: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| Some((x(r), r.eval_accuracy?)))
        .collect();
    let curve = LossCurve {
        train: &train,
        eval: &eval,
        accuracy: &accuracy,
    };
    loss_curve(path, (width, height), &curve)
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::StepRecord;
    use std::path::PathBuf;

    /// A fresh folder under the system temp dir, removed when dropped.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> TempDir {
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

    pub fn rec(step: usize, loss: f64) -> StepRecord {
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
            eval_loss: None,
            eval_accuracy: None,
        }
    }

    /// A decaying noisy loss curve (deterministic xorshift noise).
    pub fn synthetic(n: usize) -> Vec<StepRecord> {
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
}

#[cfg(test)]
mod tests {
    use super::test_util::{synthetic, TempDir};
    use super::*;

    /// The PNG decodes to the size asked for, and draws more than the background.
    #[test]
    fn loss_png_decodes_with_and_without_evaluations() {
        let dir = TempDir::new("png");
        let mut recs = synthetic(300);
        recs[40].loss = f64::NAN;
        for r in recs.iter_mut().filter(|r| r.step % 50 == 49) {
            r.eval_loss = Some(r.loss * 1.1);
            r.eval_accuracy = Some(0.5 + r.step as f64 / 1000.0);
        }
        for (name, recs) in [
            ("eval", &recs[..]),
            ("plain", &synthetic(5)[..]),
            ("empty", &[][..]),
        ] {
            let path = dir.0.join(format!("{name}.png"));
            write_loss_png(&path, recs, 640, 400).unwrap();
            let img = image::open(&path).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (640, 400));
            let inked = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
            assert!(inked > 2000, "{name}: {inked} non-white pixels");
        }
        if let Ok(out) = std::env::var("DORAC_WRITE_SAMPLE_PNG") {
            write_loss_png(Path::new(&out), &recs, 640, 400).unwrap();
        }
        let err = write_loss_png(&dir.0.join("x.png"), &recs, 10, 10).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }
}
