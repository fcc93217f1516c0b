//! The weight-decomposition analysis of the DoRA paper (arXiv 2402.09353, section 2.2): how far
//! fine-tuning moved each adapted weight in magnitude and in direction.
//!
//! For a layer whose effective `[in, out]` weight went from `W0` to `Wt`, with `m[j] = ||W[:, j]||`
//! the norm of output column `j` and `k` columns:
//! - `ΔM = (1/k) Σ_j |mt[j] - m0[j]|`
//! - `ΔD = (1/k) Σ_j (1 - cos(Wt[:, j], W0[:, j]))`
//!
//! `Wt` is the effective weight: `W0 + s (BA)ᵀ` for LoRA, that scaled per column by
//! `g = m / ||W0 + s (BA)ᵀ||` for DoRA (see [`crate::passes::effective_weight`]), the trained
//! weight for full fine-tuning. Plotting ΔD against ΔM over layers and training steps is the
//! paper's Figure 2; its finding is a positive slope for LoRA and a negative one for full
//! fine-tuning and DoRA.

use crate::error::{Error, Result, Subject};
use crate::ir::Graph;
use crate::passes::{effective_weight, find_linear_layers, in_out_weight};
use crate::train::checkpoint::{self, FULL_WEIGHTS_FILE};
use serde::Serialize;
use std::path::Path;

/// One layer of one checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerChange {
    /// The training run (its folder's name).
    pub run: String,
    /// `full`, `lora` or `dora`.
    pub method: String,
    pub step: usize,
    /// The PyTorch module name.
    pub layer: String,
    pub delta_m: f64,
    pub delta_d: f64,
}

/// ΔM and ΔD between two `[in, out]` matrices (see the module docs). A zero column's cosine
/// counts as 1 (no direction to change).
pub fn column_changes(w0: &[f64], wt: &[f64], fin: usize, fout: usize) -> (f64, f64) {
    let (mut dm, mut dd) = (0.0, 0.0);
    for j in 0..fout {
        let (mut n0, mut nt, mut dot) = (0.0, 0.0, 0.0);
        for i in 0..fin {
            let (a, b) = (w0[i * fout + j], wt[i * fout + j]);
            n0 += a * a;
            nt += b * b;
            dot += a * b;
        }
        let (n0, nt) = (n0.sqrt(), nt.sqrt());
        dm += (nt - n0).abs();
        let cos = if n0 > 0.0 && nt > 0.0 {
            dot / (n0 * nt)
        } else {
            1.0
        };
        dd += 1.0 - cos;
    }
    let k = fout.max(1) as f64;
    (dm / k, dd / k)
}

/// One trained layer of a checkpoint: its weight before and after, as `[fin, fout]` matrices.
struct TrainedLayer {
    module: String,
    after: Vec<f64>,
    before: Vec<f64>,
    fin: usize,
    fout: usize,
}

/// What a checkpoint folder holds: the method and its trained layers.
fn checkpoint_weights(base: &Graph, dir: &Path) -> Result<(String, Vec<TrainedLayer>)> {
    let before = |g: &Graph, weight, kind: &crate::ir::LinearKind, fin, fout| {
        let w = g
            .const_tensor(weight)
            .expect("weights are constants")
            .to_f64();
        in_out_weight(&w, kind, fin, fout)
    };
    let full = dir.join(FULL_WEIGHTS_FILE);
    if full.exists() {
        let mut trained = base.clone();
        let names = checkpoint::load_trained_weights(&mut trained, &full)?;
        let mut layers = vec![];
        for l in find_linear_layers(base) {
            if !names.contains(&base.node(l.weight).name) {
                continue;
            }
            let (fin, fout) = (l.in_features, l.out_features);
            let w0 = before(base, l.weight, &l.kind, fin, fout);
            let wt = before(&trained, l.weight, &l.kind, fin, fout);
            layers.push(TrainedLayer {
                module: l.module.clone(),
                after: wt,
                before: w0,
                fin,
                fout,
            });
        }
        return Ok(("full".into(), layers));
    }
    if !dir.join(crate::adapter::CONFIG_FILE).exists() {
        return Err(Error::input_at(
            Subject::file(dir),
            format!(
                "neither an adapter ({}) nor a full fine-tuning checkpoint ({FULL_WEIGHTS_FILE})",
                crate::adapter::CONFIG_FILE
            ),
        ));
    }
    let adapter = crate::adapter::load(dir)?;
    let mut graph = base.clone();
    crate::adapter::apply(&mut graph, &adapter)?;
    let method = adapter.config.method().name().to_string();
    let layers = graph
        .adapters()
        .iter()
        .map(|a| {
            let (fin, fout) = (a.in_features, a.out_features);
            let w0 = before(&graph, a.weight, &a.kind, fin, fout);
            TrainedLayer {
                module: a.module.clone(),
                after: effective_weight(&graph, a),
                before: w0,
                fin,
                fout,
            }
        })
        .collect();
    Ok((method, layers))
}

/// The changes of every layer in every checkpoint of a training run folder (its
/// `checkpoint-<step>` folders, oldest first), or of one checkpoint folder given directly.
pub fn analyze_run(base: &Graph, run: &Path) -> Result<Vec<LayerChange>> {
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.display().to_string());
    let mut checkpoints = checkpoint::list(run)?;
    checkpoints.sort();
    if checkpoints.is_empty() {
        let step = name
            .strip_prefix("checkpoint-")
            .and_then(|s| s.parse().ok());
        match step {
            Some(step) => checkpoints.push((step, run.to_path_buf())),
            None => {
                return Err(Error::input_at(Subject::file(run), "no checkpoint-<step> folders (train with --save-every N --keep-checkpoints 0 to keep them)"))
            }
        }
    }
    let mut out = vec![];
    for (step, dir) in checkpoints {
        let (method, layers) = checkpoint_weights(base, &dir)?;
        for l in layers {
            let (delta_m, delta_d) = column_changes(&l.before, &l.after, l.fin, l.fout);
            out.push(LayerChange {
                run: name.clone(),
                method: method.clone(),
                step,
                layer: l.module,
                delta_m,
                delta_d,
            });
        }
    }
    Ok(out)
}

/// What a training run reached, for the comparison table: its method, size and final
/// evaluation (from `metrics.jsonl`), and its typical step time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunSummary {
    pub run: String,
    pub method: String,
    /// Elements of the trained tensors (adapter tensors, or the fully trained weights).
    pub trainable: usize,
    pub steps: usize,
    /// The last evaluation of the run (`--eval-data`), if any.
    pub eval_loss: Option<f64>,
    pub eval_accuracy: Option<f64>,
    /// The median time between consecutive logged steps, in milliseconds (steps that also
    /// evaluated or saved a checkpoint are outliers the median ignores).
    pub step_ms: Option<f64>,
}

/// Summarises a run folder (see [`RunSummary`]); `method` as its checkpoints say.
pub fn summarize_run(run: &Path, method: &str) -> Result<RunSummary> {
    let records = crate::train::report::read_log(run)?;
    let mut checkpoints = checkpoint::list(run)?;
    checkpoints.sort();
    let last = checkpoints
        .last()
        .map(|c| c.1.clone())
        .unwrap_or_else(|| run.to_path_buf());
    let tensors = if last.join(FULL_WEIGHTS_FILE).exists() {
        last.join(FULL_WEIGHTS_FILE)
    } else {
        last.join(crate::adapter::WEIGHTS_FILE)
    };
    let trainable = crate::tensors_io::read_safetensors(&tensors)?
        .values()
        .map(|a| a.data.len())
        .sum();
    let evaluated = records.iter().rev().find(|r| r.eval_loss.is_some());
    let mut gaps: Vec<f64> = records
        .windows(2)
        .filter(|w| w[1].step == w[0].step + 1)
        .map(|w| (w[1].elapsed_s - w[0].elapsed_s) * 1e3)
        .filter(|g| g.is_finite())
        .collect();
    gaps.sort_by(f64::total_cmp);
    Ok(RunSummary {
        run: run
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        method: method.to_string(),
        trainable,
        steps: records.len(),
        eval_loss: evaluated.and_then(|r| r.eval_loss),
        eval_accuracy: evaluated.and_then(|r| r.eval_accuracy),
        step_ms: gaps.get(gaps.len() / 2).copied(),
    })
}

/// Mean and sample standard deviation (0 for one value); `None` for none.
pub fn mean_sd(values: &[f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    Some((mean, var.sqrt()))
}

/// A least-squares line `y = intercept + slope x` and Pearson's correlation of the points.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fit {
    pub slope: f64,
    pub intercept: f64,
    pub correlation: f64,
    pub points: usize,
}

/// Fits `points`; `None` with fewer than 2 points or no spread in x.
pub fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
    for &(x, y) in points {
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
        sxy += (x - mx) * (y - my);
    }
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    Some(Fit {
        slope,
        intercept: my - slope * mx,
        correlation: if syy > 0.0 {
            sxy / (sxx * syy).sqrt()
        } else {
            0.0
        },
        points: points.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_changes_by_hand() {
        // 2 inputs x 2 columns: column 0 doubles (ΔM = 1, no turn), column 1 turns 90 degrees
        // at the same length (ΔM = 0, 1 - cos = 1).
        let w0 = [1.0, 0.0, 0.0, 1.0];
        let wt = [2.0, -1.0, 0.0, 0.0];
        let (dm, dd) = column_changes(&w0, &wt, 2, 2);
        assert!(
            (dm - 0.5).abs() < 1e-15 && (dd - 0.5).abs() < 1e-15,
            "{dm} {dd}"
        );
    }

    #[test]
    fn fit_recovers_a_line() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 3.0 - 2.0 * i as f64)).collect();
        let f = fit(&pts).unwrap();
        assert!((f.slope + 2.0).abs() < 1e-12 && (f.intercept - 3.0).abs() < 1e-12);
        assert!((f.correlation + 1.0).abs() < 1e-12);
        assert!(fit(&pts[..1]).is_none());
        assert!(fit(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
    }
}
