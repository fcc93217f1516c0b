//! The reference executor: an f64 interpreter of the IR. It is the oracle every WGSL kernel is
//! tested against, the engine of constant folding, and the fallback when no GPU adapter exists.
//! It favours obvious code over speed: each op is a direct transcription of its definition.

mod ops;

pub use ops::eval_op;

use crate::error::{Error, Result};
use crate::ir::{Graph, NodeId, Op};
use crate::tensor::{shape_str, Array, DType};
use std::collections::HashMap;

/// Runs the whole graph; `inputs` are keyed by graph input name. Returns graph outputs by name.
pub fn run(graph: &Graph, inputs: &HashMap<String, Array>) -> Result<HashMap<String, Array>> {
    let values = run_all(graph, inputs)?;
    Ok(graph
        .outputs()
        .iter()
        .map(|(name, n)| (name.clone(), values[n].clone()))
        .collect())
}

/// Runs the graph and keeps every node's value (for kernel-by-kernel comparisons).
pub fn run_all(graph: &Graph, inputs: &HashMap<String, Array>) -> Result<HashMap<NodeId, Array>> {
    let mut values: HashMap<NodeId, Array> = HashMap::new();
    for n in graph.topo_order()? {
        let node = graph.node(n);
        let value = match &node.op {
            Op::Input => {
                let v = inputs.get(&node.name).ok_or_else(|| {
                    Error::input(format!("no value given for graph input '{}'", node.name))
                })?;
                if v.shape != node.shape {
                    return Err(Error::input(format!(
                        "input '{}' has shape {}, the model expects {}",
                        node.name,
                        shape_str(&v.shape),
                        shape_str(&node.shape)
                    )));
                }
                v.clone()
            }
            op => {
                let args: Vec<&Array> = graph.inputs_of(n).iter().map(|i| &values[i]).collect();
                eval_typed(op, &args, node.dtype)
                    .map_err(|e| Error::graph(format!("evaluating node '{}': {e}", node.label)))?
            }
        };
        values.insert(n, value);
    }
    Ok(values)
}

/// [`eval_op`] for a node whose value has type `dtype`: an integer value is truncated toward
/// zero and a bool is `x != 0`. Only division can leave the integers (ONNX's integer Div
/// truncates); for every other op this changes nothing.
pub fn eval_typed(op: &Op, args: &[&Array], dtype: DType) -> Result<Array> {
    let mut value = eval_op(op, args)?;
    match dtype {
        DType::F32 => {}
        DType::I64 => value.data.iter_mut().for_each(|x| *x = *x as i64 as f64),
        DType::Bool => value
            .data
            .iter_mut()
            .for_each(|x| *x = if *x != 0.0 { 1.0 } else { 0.0 }),
    }
    Ok(value)
}
