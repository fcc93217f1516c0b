//! Evaluation: a model's loss and accuracy over a whole data set, computed on the host in f64
//! from the model's outputs (logits, or predictions for `mse`), batch by batch.
//!
//! The definitions (also in `dorac eval --help`):
//! - `mse`: the mean over every output element of every example of (y - target)².
//! - `cross-entropy`: the mean over every labelled position (label != ignore index) of
//!   `logsumexp(z) - z[label]`; accuracy is the fraction of those positions whose arg-max logit
//!   (the first, on ties) is the label.
//! - `lm`: the same, where the logits at position t are scored against the label at t + 1
//!   (token accuracy).
//!
//! So the loss is a mean over positions of the whole set, not a mean of batch means: it does not
//! depend on the batch size, and a last partial batch counts exactly its own examples.
//!
//! [`Evaluator`] runs the forward pass (GPU or reference executor) with the trained tensors as
//! inputs, so a training run evaluates its current parameters without recompiling.

use super::data::Dataset;
use super::loss::LossKind;
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::runtime::{Executable, Gpu};
use crate::tensor::{Array, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// The metrics of one evaluation.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EvalMetrics {
    pub loss: f64,
    /// `correct / counted`, for classification and `lm` losses.
    pub accuracy: Option<f64>,
    /// Examples evaluated.
    pub examples: usize,
    /// What the loss averages over: output elements (`mse`) or labelled positions.
    pub counted: usize,
    /// Labelled positions whose arg-max is the label (classification and `lm`).
    pub correct: Option<usize>,
}

/// Sums over batches; [`Accumulator::finish`] divides.
pub struct Accumulator {
    kind: LossKind,
    loss_sum: f64,
    counted: usize,
    correct: usize,
    examples: usize,
}

impl Accumulator {
    pub fn new(kind: LossKind) -> Accumulator {
        Accumulator {
            kind,
            loss_sum: 0.0,
            counted: 0,
            correct: 0,
            examples: 0,
        }
    }

    /// Adds the first `rows` examples of a batch: `output` is the model output `[batch, ...]`,
    /// `labels` the labels `[batch, ...]` (targets for `mse`).
    pub fn add(&mut self, output: &[f32], out_shape: &[usize], labels: &Array, rows: usize) {
        let batch = out_shape.first().copied().unwrap_or(1).max(1);
        let per_out = output.len() / batch;
        let per_label = labels.data.len() / batch;
        self.examples += rows;
        match self.kind {
            LossKind::Mse => {
                for (y, t) in output[..rows * per_out]
                    .iter()
                    .zip(&labels.data[..rows * per_label])
                {
                    let d = *y as f64 - t;
                    self.loss_sum += d * d;
                }
                self.counted += rows * per_out;
            }
            LossKind::CrossEntropy { ignore_index } | LossKind::Lm { ignore_index } => {
                let classes = *out_shape.last().unwrap_or(&1);
                let positions = per_out / classes.max(1);
                let shift = matches!(self.kind, LossKind::Lm { .. });
                for r in 0..rows {
                    for p in 0..positions {
                        // lm: the logits at p predict the label at p + 1; the last position
                        // predicts nothing.
                        let target = if shift { p + 1 } else { p };
                        if target >= positions {
                            continue;
                        }
                        let label = labels.data[r * per_label + target] as i64;
                        if label == ignore_index {
                            continue;
                        }
                        let z = &output[(r * positions + p) * classes..][..classes];
                        self.score(z, label as usize);
                    }
                }
            }
        }
    }

    fn score(&mut self, z: &[f32], label: usize) {
        let (mut best, mut max) = (0, f64::NEG_INFINITY);
        for (i, &v) in z.iter().enumerate() {
            if (v as f64) > max {
                (best, max) = (i, v as f64);
            }
        }
        let sum: f64 = z.iter().map(|&v| (v as f64 - max).exp()).sum();
        self.loss_sum += max + sum.ln() - z[label] as f64;
        self.counted += 1;
        self.correct += usize::from(best == label);
    }

    pub fn finish(self) -> EvalMetrics {
        let classify = self.kind != LossKind::Mse;
        let mean = |x: f64| {
            if self.counted == 0 {
                f64::NAN
            } else {
                x / self.counted as f64
            }
        };
        EvalMetrics {
            loss: mean(self.loss_sum),
            accuracy: classify.then(|| mean(self.correct as f64)),
            examples: self.examples,
            counted: self.counted,
            correct: classify.then_some(self.correct),
        }
    }
}

enum Engine {
    Gpu(Box<Executable>),
    Reference,
}

/// A compiled forward pass that evaluates data sets (see the module docs).
pub struct Evaluator {
    graph: Graph,
    engine: Engine,
    output: String,
    out_shape: Vec<usize>,
    kind: LossKind,
    labels: String,
    batch: usize,
    /// The tensors given with each evaluation (trained parameters); empty for a fixed model.
    params: Vec<String>,
    /// Their current values (the reference engine reads them from here).
    values: HashMap<String, Array>,
}

impl Evaluator {
    /// Compiles `graph` as the inference pipeline prepared it for evaluation
    /// (`cli::common::evaluator`): one output, the trained tensors `params` as inputs, set by
    /// [`Evaluator::set_params`] before each evaluation, everything else folded.
    pub fn new(
        graph: Graph,
        kind: LossKind,
        labels: &str,
        params: &[String],
        gpu: Option<&Gpu>,
    ) -> Result<Evaluator> {
        let name = graph.outputs()[0].0.clone();
        let out_shape = graph.shape(graph.outputs()[0].1).to_vec();
        let batch = out_shape.first().copied().unwrap_or(1);
        let engine = match gpu {
            Some(gpu) => Engine::Gpu(Box::new(Executable::compile(gpu, &graph)?)),
            None => Engine::Reference,
        };
        Ok(Evaluator {
            graph,
            engine,
            output: name,
            out_shape,
            kind,
            labels: labels.to_string(),
            batch,
            params: params.to_vec(),
            values: HashMap::new(),
        })
    }

    /// Sets the trained tensors (by name; each must be one given to [`Evaluator::new`]).
    pub fn set_params(&mut self, values: &BTreeMap<String, Tensor>) -> Result<()> {
        for name in &self.params {
            let t = values
                .get(name)
                .ok_or_else(|| Error::graph(format!("no value for trained tensor '{name}'")))?;
            match &self.engine {
                Engine::Gpu(exe) => exe.write(name, &t.to_f32())?,
                Engine::Reference => {
                    self.values.insert(name.clone(), t.to_array());
                }
            }
        }
        Ok(())
    }

    /// Evaluates every example of `data`, in its order, in batches of the compiled batch size;
    /// the last partial batch is filled up with repeats of its first example, which are not
    /// counted.
    pub fn evaluate(&mut self, data: &Dataset) -> Result<EvalMetrics> {
        let mut acc = Accumulator::new(self.kind);
        let order: Vec<usize> = (0..data.examples).collect();
        let mut start = 0;
        while start < data.examples {
            let rows = (data.examples - start).min(self.batch);
            let mut idx: Vec<usize> = order[start..start + rows].to_vec();
            idx.resize(self.batch, order[start]);
            let batch = data.batch(&idx, 0, self.batch);
            let output = self.forward(&batch)?;
            acc.add(&output, &self.out_shape, &batch[&self.labels], rows);
            start += rows;
        }
        Ok(acc.finish())
    }

    fn forward(&mut self, batch: &BTreeMap<String, Array>) -> Result<Vec<f32>> {
        let inputs = self
            .graph
            .inputs()
            .iter()
            .map(|&i| self.graph.node(i).name.clone())
            .filter(|n| !self.params.contains(n));
        match &self.engine {
            Engine::Gpu(exe) => {
                let feed: HashMap<String, Vec<f32>> = inputs
                    .map(|n| {
                        let v = batch[&n].data.iter().map(|&x| x as f32).collect();
                        (n, v)
                    })
                    .collect();
                let mut out = exe.step(&feed, &[self.output.as_str()])?;
                Ok(out.remove(&self.output).unwrap_or_default())
            }
            Engine::Reference => {
                let mut feed = self.values.clone();
                for n in inputs {
                    feed.insert(n.clone(), batch[&n].clone());
                }
                let out = crate::reference::run(&self.graph, &feed)?;
                Ok(out[&self.output].data.iter().map(|&x| x as f32).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_and_accuracy_by_hand() {
        // Two examples, 3 classes; the second is ignored in the second batch.
        let mut acc = Accumulator::new(LossKind::CrossEntropy { ignore_index: -100 });
        let z = [2.0f32, 0.0, 0.0, 0.0, 1.0, 0.0];
        acc.add(&z, &[2, 3], &Array::new(vec![2], vec![0.0, 2.0]), 2);
        acc.add(&z, &[2, 3], &Array::new(vec![2], vec![1.0, -100.0]), 2);
        let m = acc.finish();
        let lse0 = (2f64.exp() + 2.0).ln();
        let lse1 = (1f64.exp() + 2.0).ln();
        let want = ((lse0 - 2.0) + (lse1 - 0.0) + (lse0 - 0.0)) / 3.0;
        assert!((m.loss - want).abs() < 1e-12, "{} vs {want}", m.loss);
        assert_eq!((m.counted, m.correct, m.examples), (3, Some(1), 4));
        assert_eq!(m.accuracy, Some(1.0 / 3.0));
    }

    #[test]
    fn lm_scores_the_next_token_and_mse_counts_elements() {
        // One sequence of 3 positions over 2 tokens: positions 0 and 1 are scored against labels
        // 1 and 2; the padding rows of a partial batch are not counted.
        let mut acc = Accumulator::new(LossKind::Lm { ignore_index: -100 });
        let z = [
            0.0f32, 1.0, 1.0, 0.0, 5.0, 5.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0,
        ];
        acc.add(
            &z,
            &[2, 3, 2],
            &Array::new(vec![2, 3], vec![0.0, 1.0, 1.0, 0.0, 0.0, 0.0]),
            1,
        );
        let m = acc.finish();
        assert_eq!((m.counted, m.correct, m.examples), (2, Some(1), 1));
        let mut acc = Accumulator::new(LossKind::Mse);
        acc.add(
            &[1.0, 2.0, 7.0, 7.0],
            &[2, 2],
            &Array::new(vec![2, 2], vec![0.0, 0.0, 0.0, 0.0]),
            1,
        );
        let m = acc.finish();
        assert_eq!((m.loss, m.counted, m.accuracy), (2.5, 2, None));
    }
}
