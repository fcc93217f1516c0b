//! `--storage f16|bf16`: an f32 model's frozen weights rounded to a half-precision format and
//! marked (`Graph::half_consts`) so the planner stores them in half the device memory. Compute
//! stays f32; what changes is the weights' values, by at most half a unit in their last place
//! (2^-11 relative for f16, 2^-8 for bf16), and [`HalfReport`] says by how much they did.

use crate::ir::{Graph, Half, NodeId, Op, Patch};
use crate::tensor::Tensor;

/// Weights smaller than this stay f32 (biases, norms: little memory, and often sensitive).
pub const HALF_MIN_ELEMENTS: usize = 1024;

/// What [`store_half`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HalfReport {
    pub tensors: usize,
    pub elements: usize,
    /// Largest |w - round(w)| / max |w| over the rounded tensors.
    pub max_relative_error: f64,
    /// Values outside the format's range (f16: |w| > 65504) that became infinite: then the
    /// format cannot hold the model, and the caller refuses it.
    pub overflowed: usize,
}

/// Rounds every f32 constant of at least [`HALF_MIN_ELEMENTS`] elements that is read only as a
/// weight (a MatMul's or Gemm's A or B, directly or through a transpose, DoRA's norm's W, or a
/// Gather's table) to
/// `format` and marks it half-stored. The values are changed in place (node ids, and with them
/// adapter records and state, stay valid): the reference executor then reads exactly what the
/// device decodes.
pub fn store_half(graph: &mut Graph, format: Half) -> HalfReport {
    let mut report = HalfReport::default();
    let mut p = Patch::new(graph);
    let adapters = adapter_tensors(graph);
    for n in graph.node_ids() {
        if adapters.contains(&n) {
            continue;
        }
        let Op::Const(t) = &graph.node(n).op else {
            continue;
        };
        let Some(values) = t.as_f32() else {
            continue;
        };
        // A weight kept as a quantized model's codes already takes less than half precision.
        if graph.blocked().contains_key(&n) {
            continue;
        }
        // Before fusion, any transpose may turn out to be read in place: `decodes` still
        // requires its readers to be matmul operands.
        if values.len() < HALF_MIN_ELEMENTS || !read_only_as_weight(graph, n, &|_| true, &|_| true)
        {
            continue;
        }
        let scale = values.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let mut worst = 0f64;
        let rounded: Vec<f32> = values
            .iter()
            .map(|&v| {
                let r = format.round(v);
                if r.is_infinite() && v.is_finite() {
                    report.overflowed += 1;
                } else {
                    worst = worst.max((r as f64 - v as f64).abs());
                }
                r
            })
            .collect();
        if scale > 0.0 {
            report.max_relative_error = report.max_relative_error.max(worst / scale);
        }
        report.tensors += 1;
        report.elements += rounded.len();
        let shape = t.shape.clone();
        p.set_const(n, Tensor::f32(shape, rounded))
            .expect("same shape and type");
        p.store_half(n, format);
    }
    graph.apply(p.finish());
    report
}

/// The adapters' own tensors (A, B and the magnitude), constants where an adapter was applied
/// for inference: `--storage` stores the frozen base only, as QLoRA keeps its adapters in full
/// precision.
pub(crate) fn adapter_tensors(graph: &Graph) -> std::collections::HashSet<NodeId> {
    (graph.adapters().iter())
        .flat_map(|a| [Some(a.lora_a), Some(a.lora_b), a.magnitude])
        .flatten()
        .collect()
}

/// Whether every reader of `n` reads it as a weight, in a slot that decodes half precision: a
/// MatMul's or Gemm's A or B, DoRA's norm's W, a Gather's table, or a transpose that
/// `in_place` says its readers index in place and that only such matmul slots read. Readers are
/// the consumers `is_reader` accepts (the planner: the live ones). A graph output or a constant
/// nothing reads is not a weight. The one rule for `store_half` and for the planner
/// (`codegen::storage`), which passes its own `is_reader` and `in_place`.
pub fn read_only_as_weight(
    graph: &Graph,
    n: NodeId,
    is_reader: &dyn Fn(NodeId) -> bool,
    in_place: &dyn Fn(NodeId) -> bool,
) -> bool {
    read_only_through(graph, n, is_reader, in_place, true)
}

/// As [`read_only_as_weight`], without Gather: the constants read only as a matrix by
/// products (A or B, also through a transpose read in place) and DoRA norms (W), whose kernels
/// can take a row pitch (`codegen::storage::padded_rows`).
pub fn read_only_as_matrix(
    graph: &Graph,
    n: NodeId,
    is_reader: &dyn Fn(NodeId) -> bool,
    in_place: &dyn Fn(NodeId) -> bool,
) -> bool {
    read_only_through(graph, n, is_reader, in_place, false)
}

fn read_only_through(
    graph: &Graph,
    n: NodeId,
    is_reader: &dyn Fn(NodeId) -> bool,
    in_place: &dyn Fn(NodeId) -> bool,
    gather: bool,
) -> bool {
    let readers: Vec<NodeId> = graph
        .consumers(n)
        .into_iter()
        .filter(|&c| is_reader(c))
        .collect();
    !readers.is_empty()
        && !graph.outputs().iter().any(|o| o.1 == n)
        && readers
            .iter()
            .all(|&r| decodes(graph, r, n, is_reader, in_place, gather))
}

/// Whether `reader` reads `value` only through slots that decode half precision.
fn decodes(
    graph: &Graph,
    reader: NodeId,
    value: NodeId,
    is_reader: &dyn Fn(NodeId) -> bool,
    in_place: &dyn Fn(NodeId) -> bool,
    gather: bool,
) -> bool {
    let slots: Vec<usize> = (graph.inputs_of(reader).iter().enumerate())
        .filter(|&(_, &i)| i == value)
        .map(|(s, _)| s)
        .collect();
    match &graph.node(reader).op {
        Op::MatMul | Op::Gemm { .. } => slots.iter().all(|&s| s < 2),
        Op::DoraNormSq(_) => slots == [0],
        Op::Gather { .. } => gather && slots == [0],
        Op::Transpose { .. } if in_place(reader) => graph
            .consumers(reader)
            .into_iter()
            .filter(|&c| is_reader(c))
            .all(|c| {
                matches!(graph.node(c).op, Op::MatMul | Op::Gemm { .. })
                    && decodes(graph, c, reader, is_reader, in_place, gather)
            }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::GraphBuilder;

    /// x [2, 32] @ w [32, 64] (a weight), plus w2 [32, 64] read by an add (not a weight) and a
    /// small weight under the size floor.
    fn graph(w: Vec<f32>) -> (Graph, NodeId, NodeId, NodeId) {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![2, 32]);
        let wn = g.add_const("w", Tensor::f32(vec![32, 64], w.clone()));
        let y = g.add(Op::MatMul, &[x, wn], "y", "y").unwrap();
        let w2 = g.add_const("w2", Tensor::f32(vec![2, 64], vec![0.3; 128]));
        let small = g.add_const("small", Tensor::f32(vec![64, 4], vec![0.1; 256]));
        let s = g
            .add(Op::Binary(crate::ir::Binary::Add), &[y, w2], "s", "s")
            .unwrap();
        let z = g.add(Op::MatMul, &[s, small], "z", "z").unwrap();
        g.add_output("z", z);
        (g.finish(), wn, w2, small)
    }

    #[test]
    fn rounds_and_marks_only_weights() {
        let w: Vec<f32> = (0..2048).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let (mut g, wn, w2, small) = graph(w.clone());
        let r = store_half(&mut g, Half::F16);
        assert_eq!((r.tensors, r.elements, r.overflowed), (1, 2048, 0));
        assert_eq!(g.half_consts().keys().copied().collect::<Vec<_>>(), [wn]);
        assert!(!g.half_consts().contains_key(&w2) && !g.half_consts().contains_key(&small));
        let stored = g.const_tensor(wn).unwrap().as_f32().unwrap().to_vec();
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
        let worst = (w.iter().zip(&stored))
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .fold(0.0, f64::max);
        assert!(stored
            .iter()
            .zip(&w)
            .all(|(&s, &v)| s == Half::F16.round(v)));
        assert_eq!(r.max_relative_error, worst / scale);
        assert!(r.max_relative_error > 0.0 && r.max_relative_error <= 2f64.powi(-11));
    }

    #[test]
    fn counts_values_beyond_f16() {
        let mut w = vec![1.0f32; 2048];
        w[7] = 70000.0;
        let (mut g, ..) = graph(w.clone());
        assert_eq!(store_half(&mut g, Half::F16).overflowed, 1);
        let (mut g, ..) = graph(w);
        assert_eq!(store_half(&mut g, Half::Bf16).overflowed, 0);
    }
}
