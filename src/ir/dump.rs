//! A readable text form of the IR, one node per line, for `dorac compile --emit ir` and tests.

use super::{Graph, Op};
use crate::tensor::shape_str;
use std::fmt;

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let order = match self.topo_order() {
            Ok(o) => o,
            Err(e) => return writeln!(f, "<{e}>"),
        };
        let pos: std::collections::HashMap<_, _> =
            order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        for &n in &order {
            let node = self.node(n);
            let args: Vec<String> = self
                .inputs_of(n)
                .iter()
                .map(|i| format!("%{}", pos[i]))
                .collect();
            let detail = match &node.op {
                Op::Const(t) => format!(" {}", t.dtype().name()),
                Op::Gemm {
                    alpha,
                    beta,
                    trans_a,
                    trans_b,
                } => format!(" alpha={alpha} beta={beta} trans_a={trans_a} trans_b={trans_b}"),
                Op::Reshape { shape } => format!(" to={}", shape_str(shape)),
                Op::Transpose { perm } => format!(" perm={perm:?}"),
                Op::Reduce { axes, keepdims, .. } => format!(" axes={axes:?} keepdims={keepdims}"),
                Op::LayerNorm { axis, epsilon } => format!(" axis={axis} eps={epsilon}"),
                Op::Softmax { axis } => format!(" axis={axis}"),
                Op::Unary(crate::ir::Unary::Gelu { tanh: true }) => " approximate=tanh".into(),
                _ => String::new(),
            };
            writeln!(
                f,
                "%{} = {}{}({}) : {}  # {}",
                pos[&n],
                node.op.name(),
                detail,
                args.join(", "),
                shape_str(&node.shape),
                node.name
            )?;
        }
        for (name, n) in &self.outputs {
            writeln!(f, "output {name} = %{}", pos[n])?;
        }
        for a in &self.adapters {
            writeln!(
                f,
                "adapter {} {} r={} alpha={} in={} out={} -> %{}",
                a.module,
                a.method.name(),
                a.rank,
                a.alpha,
                a.in_features,
                a.out_features,
                pos.get(&a.output).copied().unwrap_or(usize::MAX)
            )?;
        }
        Ok(())
    }
}
