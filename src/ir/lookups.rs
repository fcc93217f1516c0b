//! Rows of a table looked up by a graph input's values: an embedding's `input_ids`. ONNX makes
//! an index outside the table an error, and onnxruntime refuses it; the GPU kernels would read
//! zeros there, and the reference executor too. So callers check the user's tensors against
//! [`Graph::lookups`] before running or training, and name what is out of range.

use super::{Graph, NodeId, Op};
use crate::tensor::{Array, DType};
use std::collections::BTreeMap;

/// A Gather whose indices are a graph input's values (through reshapes, casts and identities).
pub struct Lookup {
    pub input: NodeId,
    pub gather: NodeId,
    /// The table's length along the gathered axis: valid indices are `-rows..rows`.
    pub rows: usize,
}

impl Graph {
    pub fn lookups(&self) -> Vec<Lookup> {
        let mut out = vec![];
        for &input in self.inputs() {
            if self.node(input).dtype != DType::I64 {
                continue;
            }
            let mut stack = vec![input];
            while let Some(v) = stack.pop() {
                for c in self.consumers(v) {
                    let ins = self.inputs_of(c);
                    match &self.node(c).op {
                        Op::Reshape { .. } | Op::Identity | Op::Cast { .. } => stack.push(c),
                        Op::Gather { axis } if ins.get(1) == Some(&v) => out.push(Lookup {
                            input,
                            gather: c,
                            rows: self.shape(ins[0])[*axis],
                        }),
                        _ => {}
                    }
                }
            }
        }
        out
    }

    /// Checks the values of each lookup's input in `tensors` (by input name, others skipped):
    /// the message names the tensor, the first value out of range and where it is, and the
    /// node that looks it up.
    pub fn check_lookups(&self, tensors: &BTreeMap<String, Array>) -> Result<(), String> {
        for l in self.lookups() {
            let name = &self.node(l.input).name;
            let Some(a) = tensors.get(name) else { continue };
            let rows = l.rows as f64;
            if let Some((i, v)) = a
                .data
                .iter()
                .enumerate()
                .find(|(_, &v)| !(-rows..rows).contains(&v))
            {
                let g = self.node(l.gather);
                return Err(format!(
                    "tensor '{name}' holds {v} (element {i}), outside the {} rows node '{}' \
                     looks up (valid: -{}..{})",
                    l.rows, g.label, l.rows, l.rows
                ));
            }
        }
        Ok(())
    }
}
