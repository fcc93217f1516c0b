//! The progress bar of a training run, drawn by `indicatif` on stderr:
//! `step 120/500 [=======>      ] 24% loss 0.4312 lr 1.0e-3 eval 0.5120 81.3% 3.2 steps/s ETA 1m58s`.
//!
//! It is hidden when stderr is not a terminal (CI logs stay clean; `metrics.jsonl` has every
//! step) and with `--quiet`. Lines that must reach the user whatever the terminal (evaluations)
//! go through [`Progress::println`].

use super::StepRecord;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
    /// The last evaluation's text, kept in the bar's message until the next one.
    eval: String,
}

impl Progress {
    /// `total_steps`: steps of the whole run; `start_step`: steps already done before this
    /// process started (the resumed checkpoint's step, 0 for a fresh run). The speed and ETA
    /// count only this process's steps, so create it right before the first step.
    pub fn new(total_steps: usize, start_step: usize, quiet: bool) -> Progress {
        Progress::with_target(
            total_steps,
            start_step,
            if quiet {
                ProgressDrawTarget::hidden()
            } else {
                // Hidden by indicatif when stderr is not a terminal.
                ProgressDrawTarget::stderr_with_hz(10)
            },
        )
    }

    fn with_target(total_steps: usize, start_step: usize, target: ProgressDrawTarget) -> Progress {
        let style = ProgressStyle::with_template(
            "step {pos}/{len} [{bar:20}] {percent}% {msg} {rate} ETA {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> ")
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{} steps/s", format_rate(s.per_sec()));
        });
        let bar = ProgressBar::with_draw_target(Some(total_steps as u64), target)
            .with_style(style)
            .with_position(start_step as u64);
        bar.reset_eta();
        Progress {
            bar,
            eval: String::new(),
        }
    }

    /// Reports the step `rec` just finished (with its evaluation, if one ran).
    pub fn update(&mut self, rec: &StepRecord) {
        if let Some(loss) = rec.eval_loss {
            self.eval = format!(" eval {}", format_eval(loss, rec.eval_accuracy));
        }
        self.bar.set_message(format!(
            "loss {} lr {:.1e}{}",
            format_loss(rec.loss),
            rec.lr,
            self.eval
        ));
        self.bar.set_position(rec.step as u64 + 1);
    }

    /// Prints a result line (to stdout, even with `--quiet`) above the bar.
    pub fn println(&self, line: &str) {
        self.bar.suspend(|| println!("{line}"));
    }

    /// Leaves the bar's last state on screen and ends its line (indicatif leaves the cursor at
    /// the end of the bar, where the next output would otherwise continue).
    pub fn finish(&mut self) {
        if self.bar.is_finished() {
            return;
        }
        self.bar.finish();
        if !self.bar.is_hidden() {
            eprintln!();
        }
    }
}

/// An evaluation's loss and accuracy as the progress line and logs show them.
pub fn format_eval(loss: f64, accuracy: Option<f64>) -> String {
    match accuracy {
        Some(a) => format!("{} {:.2}%", format_loss(loss), 100.0 * a),
        None => format_loss(loss),
    }
}

/// Four decimals in the usual range, scientific notation outside it.
pub fn format_loss(loss: f64) -> String {
    let a = loss.abs();
    if loss.is_finite() && a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{loss:.3e}")
    } else {
        format!("{loss:.4}")
    }
}

/// Two or three significant digits: `0.25`, `3.2`, `48.1`, `312`.
fn format_rate(r: f64) -> String {
    if !r.is_finite() {
        "--".into()
    } else if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 1.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::rec;
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(format_loss(0.43118), "0.4312");
        assert_eq!(format_loss(2.5e-5), "2.500e-5");
        assert_eq!(format_loss(f64::NAN), "NaN");
        assert_eq!(format_rate(312.4), "312");
        assert_eq!(format_rate(3.24), "3.2");
        assert_eq!(format_rate(0.254), "0.25");
        assert_eq!(format_eval(0.5, Some(0.8125)), "0.5000 81.25%");
        assert_eq!(format_eval(0.5, None), "0.5000");
    }

    #[test]
    fn the_bar_shows_step_loss_and_the_last_eval() {
        let mut p = Progress::with_target(10, 2, ProgressDrawTarget::hidden());
        let mut r = rec(4, 0.25);
        r.eval_loss = Some(0.5);
        r.eval_accuracy = Some(0.75);
        p.update(&r);
        assert_eq!(p.bar.position(), 5);
        assert_eq!(p.bar.message(), "loss 0.2500 lr 1.0e-3 eval 0.5000 75.00%");
        // The eval stays shown until the next one.
        p.update(&rec(5, 0.2));
        assert!(p.bar.message().ends_with("eval 0.5000 75.00%"));
        p.finish();
        assert!(p.bar.is_finished());
    }
}
