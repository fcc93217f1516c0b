//! MatMulNBits, of ONNX Runtime's contrib domain: a MatMul whose weight is stored in blocks of
//! 2-, 4- or 8-bit codes with a scale (and a zero point) per block, as ONNX Runtime's weight
//! quantizer writes it (the `model_q4.onnx` files of Hub repositories). The weight is a constant,
//! so the import dequantizes it once into an f32 `[K, N]` constant and the node becomes a plain
//! MatMul (plus its bias): it runs, trains and merges like any linear layer, and the DoRA rewrite
//! adapts it, with the dequantized weight as W0 (QDoRA's arrangement).

use super::lowered::tmp;
use super::Ctx;
use crate::error::Result;
use crate::ir::{Binary, NodeId, Op};
use crate::tensor::{shape_str, Tensor};

/// The layout the attributes give: `n` rows of `k` codes, `blocks` blocks of `block` codes a
/// row, `bits` bits a code, packed from the low bits of each byte up.
struct Layout {
    k: usize,
    n: usize,
    bits: usize,
    block: usize,
    blocks: usize,
}

impl Layout {
    /// Code `i` of a packed run of `bits`-bit codes.
    fn code(&self, bytes: &[f64], i: usize) -> f64 {
        let bit = i * self.bits;
        let byte = bytes[bit / 8] as u32;
        f64::from((byte >> (bit % 8)) & ((1 << self.bits) - 1))
    }

    /// The dequantized weight, `[k, n]` row-major: `(code - zero point) * scale` per block.
    fn dequantize(&self, codes: &[f64], scales: &[f64], zero_points: &ZeroPoints) -> Vec<f32> {
        let blob = self.block * self.bits / 8;
        let mut w = vec![0f32; self.k * self.n];
        for row in 0..self.n {
            for b in 0..self.blocks {
                let at = row * self.blocks + b;
                let scale = scales[at];
                let zero = match zero_points {
                    ZeroPoints::Default => f64::from(1u32 << (self.bits - 1)),
                    ZeroPoints::Packed(z) => {
                        let per_row = (self.blocks * self.bits).div_ceil(8);
                        self.code(&z[row * per_row..(row + 1) * per_row], b)
                    }
                    ZeroPoints::Float(z) => z[at],
                };
                let bytes = &codes[at * blob..(at + 1) * blob];
                for j in 0..self.block.min(self.k - b * self.block) {
                    let kk = b * self.block + j;
                    w[kk * self.n + row] = ((self.code(bytes, j) - zero) * scale) as f32;
                }
            }
        }
        w
    }
}

enum ZeroPoints {
    /// None given: the middle code, `2^(bits-1)`.
    Default,
    /// Codes packed as the weight's are, `ceil(blocks * bits / 8)` bytes a row.
    Packed(Vec<f64>),
    /// One value a block, in the scales' type.
    Float(Vec<f64>),
}

/// MatMulNBits: `A @ dequantize(B)ᵀ (+ bias)`, B `[N, blocks, block * bits / 8]` uint8.
pub fn matmul_nbits(cx: &mut Ctx) -> Result<NodeId> {
    let required = |cx: &Ctx, name: &str| -> Result<usize> {
        match cx.attr_int(name)? {
            Some(v) if v > 0 => Ok(v as usize),
            Some(v) => Err(cx.err(format!("attribute '{name}' is {v}, expected a size"))),
            None => Err(cx.err(format!("attribute '{name}' is missing"))),
        }
    };
    let (k, n, block) = (
        required(cx, "K")?,
        required(cx, "N")?,
        required(cx, "block_size")?,
    );
    let bits = cx.attr_int("bits")?.unwrap_or(4);
    // A hint of the precision to compute in: dorac computes in f32 whatever it says.
    cx.attr_int("accuracy_level")?;
    if !matches!(bits, 2 | 4 | 8) {
        return Err(cx.unsupported(format!("MatMulNBits with {bits}-bit codes")));
    }
    if block < 16 || !block.is_power_of_two() {
        return Err(cx.err(format!(
            "block_size {block} is not a power of two of at least 16"
        )));
    }
    let layout = Layout {
        k,
        n,
        bits: bits as usize,
        block,
        blocks: k.div_ceil(block),
    };
    let a = cx.input(0)?;
    let a_shape = cx.shape(a);
    if a_shape.last() != Some(&k) {
        return Err(cx.err(format!(
            "input A has shape {}, expected a last dim of K = {k}",
            shape_str(&a_shape)
        )));
    }
    let constant = |cx: &Ctx, i: usize, what: &str| -> Result<Tensor> {
        cx.const_input(i, what)?
            .ok_or_else(|| cx.err(format!("the {what} (input {i}) is missing")))
    };
    let codes = constant(cx, 1, "quantized weight")?;
    let blob = block * layout.bits / 8;
    let want = [n, layout.blocks, blob];
    if codes.dtype().is_float() {
        return Err(cx.err("the quantized weight holds floats, expected uint8 codes".into()));
    }
    if codes.shape != want {
        return Err(cx.err(format!(
            "the quantized weight has shape {}, expected {} (N, blocks, block_size * bits / 8)",
            shape_str(&codes.shape),
            shape_str(&want)
        )));
    }
    let scales = constant(cx, 2, "scales")?;
    if scales.numel() != n * layout.blocks || !scales.dtype().is_float() {
        return Err(cx.err(format!(
            "the scales are {} {}, expected {} floats (N x blocks)",
            scales.dtype().name(),
            shape_str(&scales.shape),
            n * layout.blocks
        )));
    }
    let zero_points = match cx.const_input(3, "zero points")? {
        None => ZeroPoints::Default,
        Some(z) if z.dtype().is_float() && z.numel() == n * layout.blocks => {
            ZeroPoints::Float(z.to_f64())
        }
        Some(z)
            if !z.dtype().is_float()
                && z.numel() == n * (layout.blocks * layout.bits).div_ceil(8) =>
        {
            ZeroPoints::Packed(z.to_f64())
        }
        Some(z) => {
            return Err(cx.err(format!(
                "the zero points are {} {}: expected N x blocks floats ({}) or packed uint8 \
                 codes ({})",
                z.dtype().name(),
                shape_str(&z.shape),
                n * layout.blocks,
                n * (layout.blocks * layout.bits).div_ceil(8)
            )))
        }
    };
    if cx.opt_input(4)?.is_some() {
        return Err(cx.unsupported("MatMulNBits with g_idx (a permutation of K)".into()));
    }
    let bias = cx.opt_input(5)?;
    let w = layout.dequantize(&codes.to_f64(), &scales.to_f64(), &zero_points);
    let name = cx.temp_name("weight");
    let w = cx.add_const(&name, Tensor::f32(vec![k, n], w))?;
    match bias {
        None => cx.add(Op::MatMul, &[a, w]),
        Some(bias) => {
            if cx.shape(bias) != [n] {
                return Err(cx.err(format!(
                    "the bias has shape {}, expected [{n}]",
                    shape_str(&cx.shape(bias))
                )));
            }
            let y = tmp(cx, Op::MatMul, &[a, w], "matmul")?;
            cx.add(Op::Binary(Binary::Add), &[y, bias])
        }
    }
}
