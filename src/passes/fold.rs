//! Constant folding: a node whose inputs are all constants becomes a constant, computed by the
//! reference executor in f64 and stored as the node's type (floats rounded once to f32; integer
//! and bool values, shapes and masks, exactly). For inference this evaluates the whole DoRA
//! norm and magnitude scale `g` at compile time, so running an adapted model never recomputes it.

use crate::error::Result;
use crate::ir::{rewrite, Graph, NodeId, Op, Patch, PatchOps, Rule};
use crate::reference::eval_typed;
use std::collections::HashSet;

/// Folds everything that depends only on constants, except the nodes in `keep_variable` (e.g.
/// trainable parameters, which are constants in the IR but change every training step).
pub fn fold_constants(graph: &mut Graph, keep_variable: &HashSet<NodeId>) -> Result<usize> {
    rewrite(graph, &[&FoldConstants { keep_variable }])
}

struct FoldConstants<'a> {
    keep_variable: &'a HashSet<NodeId>,
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
