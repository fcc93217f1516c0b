//! Constant folding: a node whose inputs are all constants becomes a constant, computed by the
//! reference executor in f64 and stored as the node's type (floats rounded once to f32; integer
//! and bool values, shapes and masks, exactly). For inference this evaluates the whole DoRA
//! norm and magnitude scale `g` at compile time, so running an adapted model never recomputes it.
//! Two exceptions: a broadcast of a constant whose readers broadcast by themselves is dropped,
//! not folded into a constant of the broadcast size (`drop_broadcast`); and a transpose of a
//! constant that only products with a computed operand read stays, for them to read in place
//! (`read_through`).

use crate::error::Result;
use crate::ir::op::broadcast;
use crate::ir::{rewrite, Graph, NodeId, Op, Patch, PatchOps, Rule};
use crate::reference::eval_typed;
use std::collections::HashSet;

/// Folds everything that depends only on constants, except the nodes in `keep_variable` (e.g.
/// trainable parameters, which are constants in the IR but change every training step).
pub fn fold_constants(graph: &mut Graph, keep_variable: &HashSet<NodeId>) -> Result<usize> {
    // Merging only removes nodes, each for a twin of the same kind: the set stays right.
    let constant = constant_only(graph, keep_variable);
    merge_repeats(graph, &constant);
    rewrite(
        graph,
        &[&FoldConstants {
            keep_variable,
            constant: &constant,
        }],
    )
}

struct FoldConstants<'a> {
    keep_variable: &'a HashSet<NodeId>,
    /// The nodes that depend on constants only (folded by the end), before folding.
    constant: &'a HashSet<NodeId>,
}

/// Constant-only nodes that repeat an earlier one (the same op of the same inputs) are replaced
/// by it, so each value is folded once: the importer lowers every attention's rotary lookup with
/// its own reshape of the model's one cos and sin cache (a 0.5B decoder: 96 copies of 4 MB).
fn merge_repeats(graph: &mut Graph, constant: &HashSet<NodeId>) {
    let mut first: std::collections::HashMap<String, NodeId> = Default::default();
    // Each replaced node's stand-in, so that repeats of repeats are found in the same sweep.
    let mut same: std::collections::HashMap<NodeId, NodeId> = Default::default();
    let mut p = Patch::new(graph);
    for n in graph.topo_order().unwrap_or_default() {
        let op = &graph.node(n).op;
        if !constant.contains(&n) || matches!(op, Op::Const(_)) {
            continue;
        }
        let inputs: Vec<NodeId> = (graph.inputs_of(n).iter())
            .map(|i| same.get(i).copied().unwrap_or(*i))
            .collect();
        let key = format!("{op:?} {inputs:?} {:?}", graph.node(n).dtype);
        match first.get(&key) {
            Some(&earlier) => {
                p.replace(n, earlier.into());
                same.insert(n, earlier);
            }
            None => {
                first.insert(key, n);
            }
        }
    }
    if !same.is_empty() {
        graph.apply(p.finish());
        graph.remove_dead();
    }
}

/// Every node computed from constants only (not from inputs or `keep_variable`), constants
/// included.
fn constant_only(graph: &Graph, keep_variable: &HashSet<NodeId>) -> HashSet<NodeId> {
    let mut constant = HashSet::new();
    for n in graph.topo_order().unwrap_or_default() {
        let yes = match graph.node(n).op {
            Op::Input => false,
            Op::Const(_) => !keep_variable.contains(&n),
            _ => graph.inputs_of(n).iter().all(|i| constant.contains(i)),
        };
        if yes {
            constant.insert(n);
        }
    }
    constant
}

impl Rule for FoldConstants<'_> {
    fn name(&self) -> &str {
        "fold_constants"
    }

    fn apply(&self, graph: &Graph, node: NodeId) -> Result<Option<PatchOps>> {
        let n = graph.node(node);
        if matches!(n.op, Op::Input | Op::Const(_)) {
            return Ok(None);
        }
        let inputs = graph.inputs_of(node);
        let all_const = inputs
            .iter()
            .all(|i| matches!(graph.node(*i).op, Op::Const(_)) && !self.keep_variable.contains(i));
        if !all_const {
            return Ok(None);
        }
        if let Some(patch) = drop_broadcast(graph, node) {
            return Ok(Some(patch));
        }
        if read_through(graph, node, self.constant) {
            return Ok(None);
        }
        let args: Vec<_> = inputs
            .iter()
            .map(|&i| graph.const_tensor(i).unwrap().to_array())
            .collect();
        let refs: Vec<_> = args.iter().collect();
        let value = eval_typed(&n.op, &refs, n.dtype)?;
        let mut p = Patch::new(graph);
        let c = p.constant(&n.name, value.to_tensor(n.dtype));
        p.claim_name(c);
        p.replace(node, c);
        Ok(Some(p.finish()))
    }
}

/// A Transpose of a constant whose every reader is a matrix product (as its A or B) whose other
/// operand is computed: the product will not fold, and it reads a transposed operand through
/// the source's strides (`codegen::fusion`'s operand transposes), so the transpose costs no
/// kernel and no memory. Folded, it would be a transposed copy of the constant: in training,
/// one of every frozen weight for the input gradient `dX = dY Wᵀ`, doubling the weights' memory
/// and their upload. A product of two constants still folds, its transposes first.
fn read_through(graph: &Graph, node: NodeId, constant: &HashSet<NodeId>) -> bool {
    if !matches!(graph.node(node).op, Op::Transpose { .. }) || graph.shape(node).len() < 2 {
        return false;
    }
    // A folded constant is a new node, of a constant value.
    let computed = |i: NodeId| !matches!(graph.node(i).op, Op::Const(_)) && !constant.contains(&i);
    let readers = graph.consumers(node);
    let is_output = graph.outputs().iter().any(|&(_, o)| o == node);
    !is_output
        && !readers.is_empty()
        && readers.into_iter().all(|r| {
            let inputs = graph.inputs_of(r);
            match graph.node(r).op {
                Op::MatMul => inputs.iter().any(|&i| i != node && computed(i)),
                Op::Gemm { .. } => {
                    inputs.get(2) != Some(&node)
                        && inputs[..2].iter().any(|&i| i != node && computed(i))
                }
                _ => false,
            }
        })
}

/// An Expand of a constant whose readers all broadcast their operands to its shape anyway
/// (element-wise binaries and Where whose output has that shape) is dropped: they read the
/// small constant instead. Folded, it would become a constant of the expanded size to upload,
/// keep on the device and read each run (MSE's gradient spreads the mean's `1 / count` over
/// the whole output: 256 KB in the train bench); kept as a node, a kernel would compute it.
fn drop_broadcast(graph: &Graph, node: NodeId) -> Option<PatchOps> {
    let Op::Expand { .. } = graph.node(node).op else {
        return None;
    };
    let source = graph.inputs_of(node)[0];
    let readers = graph.consumers(node);
    let broadcasts_itself = |r: NodeId| {
        matches!(graph.node(r).op, Op::Binary(_) | Op::Where)
            && (graph.inputs_of(r).iter())
                .map(|&i| graph.shape(if i == node { source } else { i }))
                .try_fold(vec![], |acc: Vec<usize>, s| broadcast(&acc, s))
                .is_some_and(|shape| shape == graph.shape(r))
    };
    let is_output = graph.outputs().iter().any(|&(_, o)| o == node);
    if is_output || readers.is_empty() || !readers.into_iter().all(broadcasts_itself) {
        return None;
    }
    let mut p = Patch::new(graph);
    p.replace(node, source.into());
    Some(p.finish())
}
