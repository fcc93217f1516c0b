//! The training data: named tensors whose dim 0 indexes examples, checked against the model
//! before the first step. Batches are slices along dim 0 in an order fixed by (seed, epoch), so
//! a resumed run sees exactly the batches an uninterrupted run would.

use super::loss::LossKind;
use crate::error::{Error, Result, Subject};
use crate::tensor::{shape_str, Array, Rng};
use crate::tensors_io::{read_safetensors_typed, Stored};
use std::collections::BTreeMap;
use std::path::Path;

/// A loaded, validated data set.
pub struct Dataset {
    pub tensors: BTreeMap<String, Array>,
    pub examples: usize,
}

/// What the model needs from the data: per-example shapes of each tensor.
pub struct Expected<'a> {
    /// Model inputs: name, shape of ONE example (the model's shape without dim 0), and whether
    /// the model reads integers (token ids, masks) rather than floats.
    pub inputs: Vec<(String, Vec<usize>, bool)>,
    pub labels: &'a str,
    /// Per-example label shape.
    pub label_shape: Vec<usize>,
    pub loss: LossKind,
    /// Class count for range checks (classification losses).
    pub classes: Option<usize>,
}

impl<'a> Expected<'a> {
    /// What a model batched along dim 0 needs: each graph input's per-example shape, and labels
    /// for `loss` on the output `output`.
    pub fn for_model(
        graph: &crate::ir::Graph,
        output: crate::ir::NodeId,
        labels: &'a str,
        loss: LossKind,
    ) -> Expected<'a> {
        let out_shape = graph.shape(output).to_vec();
        Expected {
            inputs: graph
                .inputs()
                .iter()
                .map(|&i| {
                    let node = graph.node(i);
                    let integer = node.dtype != crate::tensor::DType::F32;
                    (node.name.clone(), graph.shape(i)[1..].to_vec(), integer)
                })
                .collect(),
            labels,
            label_shape: loss.label_shape(&out_shape)[1..].to_vec(),
            loss,
            classes: loss.classes(&out_shape),
        }
    }
}

/// Loads `path` and checks names, shapes, dtypes and label ranges, naming the tensor at fault.
pub fn load(path: &Path, want: &Expected) -> Result<Dataset> {
    from_tensors(path, read_safetensors_typed(path)?, want)
}

/// The number of examples (dim 0 of the first tensor) of a file's tensors, before checking.
pub fn count_examples(raw: &BTreeMap<String, (Array, Stored)>) -> usize {
    raw.values()
        .next()
        .and_then(|(a, _)| a.shape.first().copied())
        .unwrap_or(0)
}

/// Each tensor's shape without dim 0 (one example's), by name, before checking.
pub fn example_shapes(
    raw: &BTreeMap<String, (Array, Stored)>,
) -> std::collections::HashMap<String, Vec<usize>> {
    raw.iter()
        .filter(|(_, (a, _))| !a.shape.is_empty())
        .map(|(k, (a, _))| (k.clone(), a.shape[1..].to_vec()))
        .collect()
}

/// Checks tensors already read from `path` (see [`load`]).
pub fn from_tensors(
    path: &Path,
    mut raw: BTreeMap<String, (Array, Stored)>,
    want: &Expected,
) -> Result<Dataset> {
    let file = path.display().to_string();
    let in_file = available_names(&raw);
    let mut tensors = BTreeMap::new();
    let mut examples: Option<(usize, String)> = None;
    let mut take = |name: &str,
                    per_example: &[usize],
                    integer: bool,
                    raw: &mut BTreeMap<String, (Array, Stored)>|
     -> Result<()> {
        let Some((a, stored)) = raw.remove(name) else {
            return Err(Error::input_at(
                Subject::context(&file),
                format!("no tensor named '{name}' (it has: {in_file})"),
            ));
        };
        match (integer, stored) {
            (true, Stored::Float(t)) => {
                return Err(Error::input_at(Subject::context(&file), format!("'{name}' holds {t}; expected integers (int64 or int32): class labels and token ids are integers")))
            }
            (false, Stored::Int(t)) => {
                return Err(Error::input_at(Subject::context(&file), format!("'{name}' holds {t}; expected floating-point values")))
            }
            _ => {}
        }
        if a.shape.is_empty() || a.shape[1..] != *per_example {
            return Err(Error::input_at(
                Subject::context(&file),
                format!(
                    "'{name}' has shape {}, expected [examples, {}]",
                    shape_str(&a.shape),
                    per_example
                        .iter()
                        .map(|d| d.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        match &examples {
            Some((n, other)) if *n != a.shape[0] => {
                return Err(Error::input_at(
                    Subject::context(&file),
                    format!("'{name}' has {} examples but '{other}' has {n}", a.shape[0]),
                ))
            }
            None => examples = Some((a.shape[0], name.to_string())),
            _ => {}
        }
        tensors.insert(name.to_string(), a);
        Ok(())
    };
    // An input with no elements (a key/value cache of length 0 in an export with one) has one
    // value only: the data need not hold it.
    let mut empty = vec![];
    for (name, shape, integer) in &want.inputs {
        if shape.contains(&0) && !raw.contains_key(name) {
            empty.push((name, shape));
            continue;
        }
        take(name, shape, *integer, &mut raw)?;
    }
    let integer_labels = want.loss != LossKind::Mse;
    take(want.labels, &want.label_shape, integer_labels, &mut raw)?;
    if let Some(classes) = want.classes {
        let ignore = match want.loss {
            LossKind::CrossEntropy { ignore_index } | LossKind::Lm { ignore_index } => ignore_index,
            LossKind::Mse => i64::MIN,
        };
        let labels = &tensors[want.labels];
        if let Some((i, &v)) = labels
            .data
            .iter()
            .enumerate()
            .find(|(_, &v)| v as i64 != ignore && (v < 0.0 || v as usize >= classes))
        {
            let per = labels.data.len() / labels.shape[0].max(1);
            return Err(Error::input_at(Subject::context(&file), format!("label {} of example {} in '{}' is out of range: classes are 0..{} (ignore index {ignore})", v as i64, i / per.max(1), want.labels, classes - 1)));
        }
    }
    let examples = examples.map(|e| e.0).unwrap_or(0);
    if examples == 0 {
        return Err(Error::input_at(
            Subject::context(&file),
            "the data set has no examples",
        ));
    }
    for (name, shape) in empty {
        let shape = std::iter::once(examples).chain(shape.iter().copied());
        tensors.insert(name.clone(), Array::zeros(shape.collect()));
    }
    Ok(Dataset { tensors, examples })
}

fn available_names(raw: &BTreeMap<String, (Array, Stored)>) -> String {
    raw.iter()
        .map(|(k, (a, s))| format!("{k} {} {}", s.name(), shape_str(&a.shape)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Dataset {
    /// Full batches per epoch (the last partial batch is dropped: shapes are static).
    pub fn batches_per_epoch(&self, batch_size: usize) -> Result<usize> {
        if batch_size == 0 || batch_size > self.examples {
            return Err(Error::input_at(
                Subject::flag_value("--batch-size", batch_size),
                format!("the data set has {} examples", self.examples),
            ));
        }
        Ok(self.examples / batch_size)
    }

    /// The example order of one epoch: a seeded shuffle, or the file's order.
    pub fn order(&self, seed: u64, epoch: usize, shuffle: bool) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.examples).collect();
        if shuffle {
            let mut rng =
                Rng::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5eed);
            for i in (1..idx.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                idx.swap(i, j);
            }
        }
        idx
    }

    /// The tensors of batch `b` (0-based, within its epoch) of the given order.
    pub fn batch(&self, order: &[usize], b: usize, batch_size: usize) -> BTreeMap<String, Array> {
        let rows = &order[b * batch_size..(b + 1) * batch_size];
        self.tensors
            .iter()
            .map(|(name, a)| {
                let per: usize = a.shape[1..].iter().product();
                let mut data = Vec::with_capacity(rows.len() * per);
                for &r in rows {
                    data.extend_from_slice(&a.data[r * per..(r + 1) * per]);
                }
                let mut shape = a.shape.clone();
                shape[0] = batch_size;
                (name.clone(), Array::new(shape, data))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key/value cache of length 0 (an Optimum export trained without one) has no elements:
    /// the data need not hold it, and each batch gets its empty tensor. A missing input that
    /// has elements is still refused, listing what the file holds.
    #[test]
    fn empty_inputs_need_no_data() {
        let ids = Array::new(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let raw = BTreeMap::from([
            ("input_ids".to_string(), (ids.clone(), Stored::Int("int64"))),
            ("labels".to_string(), (ids, Stored::Int("int64"))),
        ]);
        let mut want = Expected {
            inputs: vec![
                ("input_ids".into(), vec![2], true),
                ("past_key_values.0.key".into(), vec![4, 0, 8], false),
            ],
            labels: "labels",
            label_shape: vec![2],
            loss: LossKind::Lm { ignore_index: -100 },
            classes: None,
        };
        let data = from_tensors(Path::new("d.safetensors"), raw.clone(), &want).unwrap();
        let batch = data.batch(&data.order(0, 0, false), 1, 1);
        assert_eq!(batch["past_key_values.0.key"].shape, [1, 4, 0, 8]);
        assert_eq!(batch["input_ids"].data, [3.0, 4.0]);

        want.inputs[1].1 = vec![4, 1, 8];
        let e = from_tensors(Path::new("d.safetensors"), raw, &want)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("no tensor named 'past_key_values.0.key'")
                && e.contains("it has: input_ids int64 3x2, labels int64 3x2"),
            "{e}"
        );
    }
}
