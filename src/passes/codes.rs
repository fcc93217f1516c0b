//! `--storage int4|int8`: an f32 model's frozen weights quantized to block codes, as QLoRA and
//! QDoRA keep their base model in 4 bits, and kept as those codes on the device and the host
//! (`ir::blocks`), so a weight takes 4 (or 8) bits and 2 floats a block of 32 instead of 32 bits
//! a value. The scheme is ONNX Runtime's MatMulNBits quantizer's (`ir::quantize_nbits`: each
//! block's range stretched to include 0, an integer zero point a block, values rounded to the
//! nearest code), with blocks along a layer's input features. The weights then hold the values
//! the codes decode to (each within half a step of its block of the original), and every pass
//! after this one reads those: it runs before DoRA's norms and magnitudes are taken from the
//! weights, as PEFT takes them from a quantized base's dequantized weights.

use super::half::{adapter_tensors, read_only_as_weight, HalfReport, HALF_MIN_ELEMENTS};
use crate::ir::{quantize_nbits, BlockCodes, BlockFormat, Graph, NodeId, Op, Patch, ZeroPointForm};
use crate::tensor::DType;
use std::sync::Arc;

/// Codes a block.
pub const CODE_BLOCK: usize = 32;

/// Quantizes every f32 matrix of at least [`HALF_MIN_ELEMENTS`] values that is read only as a
/// weight (the rule half precision stores by) to `bits`-bit codes, and marks it to keep them.
/// Constants that are already half precision or codes, and adapters applied as constants, are
/// left as they are.
pub fn store_codes(graph: &mut Graph, bits: usize) -> HalfReport {
    let mut report = HalfReport::default();
    let mut p = Patch::new(graph);
    let adapters = adapter_tensors(graph);
    for n in graph.node_ids() {
        let Op::Const(t) = &graph.node(n).op else {
            continue;
        };
        if adapters.contains(&n) {
            continue;
        }
        let &[rows, cols] = t.shape.as_slice() else {
            continue;
        };
        if t.dtype() != DType::F32
            || t.numel() < HALF_MIN_ELEMENTS
            || graph.stored(n).is_some()
            || !read_only_as_weight(graph, n, &|_| true, &|_| true)
        {
            continue;
        }
        // Blocks run along the input features: down the columns of a `[in, out]` weight.
        let down = along_columns(graph, n);
        let (k, m) = if down { (rows, cols) } else { (cols, rows) };
        let (q, largest) = t.with_f32(|w| {
            let largest = w.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
            let store = |v: f64| v as f32 as f64;
            let q = match down {
                true => quantize_nbits(w, (k, m), (bits, CODE_BLOCK), ZeroPointForm::Packed, store),
                false => {
                    let wt: Vec<f32> = (0..cols)
                        .flat_map(|c| (0..rows).map(move |r| (r, c)))
                        .map(|(r, c)| w[r * cols + c])
                        .collect();
                    quantize_nbits(
                        &wt,
                        (k, m),
                        (bits, CODE_BLOCK),
                        ZeroPointForm::Packed,
                        store,
                    )
                }
            };
            (q, largest)
        });
        let blocks = k.div_ceil(CODE_BLOCK);
        let line = blocks * CODE_BLOCK;
        let Some(format) = BlockFormat::new(&t.shape, bits, CODE_BLOCK, down, line, blocks, true)
        else {
            continue;
        };
        let zero_bytes = (blocks * bits).div_ceil(8);
        let zeros = (0..m * blocks)
            .map(|at| {
                let (l, b) = (at / blocks, at % blocks);
                let bit = b * bits;
                let byte = q.zero_codes[l * zero_bytes + bit / 8];
                ((byte >> (bit % 8)) & ((1 << bits) - 1) as u8) as f32
            })
            .collect();
        let codes = Arc::new(BlockCodes {
            format,
            codes: q.codes,
            scales: q.scales.iter().map(|&s| s as f32).collect(),
            zeros,
        });
        if largest > 0.0 {
            report.max_relative_error = report.max_relative_error.max(q.max_abs / largest);
        }
        report.tensors += 1;
        report.elements += t.numel();
        p.set_const(n, BlockCodes::tensor(&codes, t.shape.clone()))
            .expect("same shape and type");
        p.store_blocked(n, codes);
    }
    graph.apply(p.finish());
    report
}

/// Whether `w`'s input features run down its columns: a product reads it as `[in, out]` (a
/// MatMul's or an untransposed Gemm's B, DoRA's norm of such a weight); else along its rows
/// (Gemm's transB and PyTorch's `[out, in]`, an embedding table, a transpose read in place).
fn along_columns(graph: &Graph, w: NodeId) -> bool {
    graph.consumers(w).into_iter().any(|c| {
        let b = graph.inputs_of(c).get(1) == Some(&w);
        match &graph.node(c).op {
            Op::MatMul | Op::Gemm { trans_b: false, .. } => b,
            Op::DoraNormSq(p) => !p.weight_out_in,
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::GraphBuilder;
    use crate::tensor::{Rng, Tensor};

    /// Weights become codes within half a step of their blocks, in both orientations; what a
    /// non-weight reader reads, small tensors and already-half ones stay as they were.
    #[test]
    fn weights_become_codes_within_half_a_step() {
        let mut rng = Rng::new(3);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect() };
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![2, 64]);
        let w = g.add_const("w", Tensor::f32(vec![64, 48], values(64 * 48)));
        let wt = g.add_const("wt", Tensor::f32(vec![40, 64], values(40 * 64)));
        let small = g.add_const("small", Tensor::f32(vec![64, 8], values(64 * 8)));
        let y = g.add(Op::MatMul, &[x, w], "y", "y").unwrap();
        let gemm = Op::Gemm {
            alpha: 1.0,
            beta: 0.0,
            trans_a: false,
            trans_b: true,
        };
        let z = g.add(gemm, &[x, wt], "z", "z").unwrap();
        let s = g.add(Op::MatMul, &[x, small], "s", "s").unwrap();
        for (name, v) in [("y", y), ("z", z), ("s", s)] {
            g.add_output(name, v);
        }
        let mut g = g.finish();
        let before = |g: &Graph, n: NodeId| g.const_tensor(n).unwrap().as_f32().unwrap().to_vec();
        let (w0, wt0) = (before(&g, w), before(&g, wt));
        let r = store_codes(&mut g, 4);
        assert_eq!((r.tensors, r.elements), (2, 64 * 48 + 40 * 64));
        assert!(r.max_relative_error > 0.0 && r.max_relative_error < 2.0 / 15.0 / 2.0 + 1e-6);
        for (n, old, down) in [(w, w0, true), (wt, wt0, false)] {
            let codes = &g.blocked()[&n];
            assert_eq!(codes.format.down_columns, down);
            let now = g.const_tensor(n).unwrap().as_f32().unwrap().to_vec();
            assert!(codes.decodes_to(&now));
            // Within half a step of each block's scale (a zero point shifts no value by more).
            let step = codes.scales.iter().fold(0f32, |a, s| a.max(s.abs()));
            assert!(now
                .iter()
                .zip(&old)
                .all(|(a, b)| (a - b).abs() <= step / 2.0 + 1e-6));
        }
        assert!(!g.blocked().contains_key(&small));
    }

    /// Codes come before adapters (the CLI's order): the base weight becomes codes, and an
    /// adapter applied afterwards as constants (A [32, 64], B [48, 32]: weights by shape and
    /// readers) is never quantized, also by a second pass.
    #[test]
    fn adapters_stay_f32() {
        use crate::passes::{find_linear_layers, insert_adapters, AdapterInit, AdapterSpec};
        let mut rng = Rng::new(4);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.range(-1.0, 1.0) as f32).collect() };
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![2, 64]);
        let w = g.add_const("fc.weight", Tensor::f32(vec![64, 48], values(64 * 48)));
        let y = g.add(Op::MatMul, &[x, w], "y", "y").unwrap();
        g.add_output("y", y);
        let mut g = g.finish();
        assert_eq!(store_codes(&mut g, 4).tensors, 1);
        assert!(g.blocked().contains_key(&w));
        let layer = find_linear_layers(&g).remove(0);
        let spec = AdapterSpec {
            layer,
            method: crate::ir::Method::Dora,
            rank: 32,
            alpha: 32.0,
            rslora: false,
            init: AdapterInit::Tensors {
                a: Tensor::f32(vec![32, 64], values(32 * 64)),
                b: Tensor::f32(vec![48, 32], values(48 * 32)),
                m: Some(Tensor::f32(vec![48], values(48))),
            },
        };
        insert_adapters(&mut g, vec![spec]).unwrap();
        let a = g.adapters()[0].clone();
        let (a0, b0) = (
            g.const_tensor(a.lora_a).cloned(),
            g.const_tensor(a.lora_b).cloned(),
        );
        assert!(
            a0.is_some() && b0.is_some(),
            "applied adapters are constants"
        );
        assert_eq!(store_codes(&mut g, 4).tensors, 0);
        assert_eq!(g.const_tensor(a.lora_a).cloned(), a0);
        assert_eq!(g.const_tensor(a.lora_b).cloned(), b0);
        assert!(g.blocked().contains_key(&w));
    }
}
