//! A readable text form of the IR, one node per line, for `dorac compile --emit ir` and tests.

use super::{Graph, Op};
use crate::tensor::{shape_str, DType};
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
                Op::Cast { to } => format!(" to={}", to.name()),
                Op::Gather { axis } | Op::GatherElements { axis } | Op::Concat { axis } => {
                    format!(" axis={axis}")
                }
                Op::GatherND { batch_dims } => format!(" batch_dims={batch_dims}"),
                Op::Slice {
                    starts,
                    ends,
                    steps,
                } => format!(" starts={starts:?} ends={ends:?} steps={steps:?}"),
                Op::Trilu { upper, k } => format!(" upper={upper} k={k}"),
                _ => String::new(),
            };
            // Non-float values name their type (constants already do, in `detail`).
            let dtype = match (&node.op, node.dtype) {
                (Op::Const(_), _) | (_, DType::F32) => String::new(),
                (_, t) => format!(" {}", t.name()),
            };
            writeln!(
                f,
                "%{} = {}{}({}) : {}{dtype}  # {}",
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

/// Graphviz (dot) view of the graph: ops as boxes labelled with op and shape, inputs as
/// ellipses, constants as small grey notes, adapter tensors highlighted.
pub fn to_dot(g: &Graph) -> String {
    let mut out = String::from(
        "digraph dorac {\n  rankdir=TB;\n  node [fontname=\"Helvetica\", fontsize=10];\n",
    );
    let adapter_nodes: std::collections::HashSet<_> = g
        .adapters
        .iter()
        .flat_map(|a| [Some(a.lora_a), Some(a.lora_b), a.magnitude])
        .flatten()
        .collect();
    let escape = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut ids: Vec<_> = g.graph.node_indices().collect();
    ids.sort();
    for n in &ids {
        let node = g.node(*n);
        let (shape, style) = match node.op {
            Op::Input => ("ellipse", "filled\", fillcolor=\"#dbeafe"),
            Op::Const(_) if adapter_nodes.contains(n) => ("note", "filled\", fillcolor=\"#fde68a"),
            Op::Const(_) => ("note", "filled\", fillcolor=\"#eeeeee"),
            _ => ("box", "rounded"),
        };
        out += &format!(
            "  n{} [shape={shape}, style=\"{style}\", label=\"{}\\n{}\\n{}\"];\n",
            n.index(),
            escape(node.op.name()),
            escape(&node.name),
            shape_str(&node.shape)
        );
    }
    for n in &ids {
        for (slot, i) in g.inputs_of(*n).iter().enumerate() {
            out += &format!(
                "  n{} -> n{} [label=\"{slot}\", fontsize=8];\n",
                i.index(),
                n.index()
            );
        }
    }
    for (name, n) in &g.outputs {
        out += &format!(
            "  out_{0} [shape=ellipse, style=\"filled\", fillcolor=\"#dcfce7\", label=\"{1}\"];\n  n{2} -> out_{0};\n",
            n.index(),
            escape(name),
            n.index()
        );
    }
    out + "}\n"
}
