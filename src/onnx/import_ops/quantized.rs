//! Quantized models.
//!
//! - QuantizeLinear, DynamicQuantizeLinear, MatMulInteger and ConvInteger (ONNX Runtime's
//!   dynamically quantized `model_quantized.onnx`, and QDQ models) compute on integer-valued
//!   floats: codes are rounded (half to even) and saturated to their type's range.
//! - MatMulNBits, of ONNX Runtime's contrib domain: a MatMul whose weight is stored in blocks of
//!   2-, 4- or 8-bit codes with a scale (and a zero point) per block, as ONNX Runtime's weight
//!   quantizer writes it (the `model_q4.onnx` files of Hub repositories). The weight is a
//!   constant, so the import makes it an f32 `[K, N]` constant that keeps its codes
//!   (`ir::blocks`: the device stores those, and the host computes the values only when read),
//!   and the node becomes a plain MatMul (plus its bias): it runs, trains and merges like any
//!   linear layer, and the DoRA rewrite adapts it, with the dequantized weight as W0 (QDoRA's
//!   arrangement).

use super::lowered::{spread_quantization, tmp};
use super::Ctx;
use crate::error::Result;
use crate::ir::{unary, Binary, BlockCodes, BlockFormat, NodeId, Op, Reduce};
use crate::onnx::proto::tensor_proto::DataType;
use crate::tensor::{numel, shape_str, DType, Tensor};

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
    fn code(&self, bytes: &[i64], i: usize) -> f64 {
        let bit = i * self.bits;
        let byte = bytes[bit / 8] as u32;
        f64::from((byte >> (bit % 8)) & ((1 << self.bits) - 1))
    }

    /// The weight's codes (`ir::blocks`: a line per column of the weight, as the file has them),
    /// from which its values are computed and which the device may store; `None` for a layout
    /// too large to describe (dims past u32).
    fn block_codes(
        &self,
        codes: &[i64],
        scales: &[f64],
        zero_points: &ZeroPoints,
    ) -> Option<BlockCodes> {
        let line = self.blocks * self.block;
        let format = BlockFormat::new(
            &[self.k, self.n],
            self.bits,
            self.block,
            true,
            line,
            self.blocks,
            !matches!(zero_points, ZeroPoints::Default),
        )?;
        let zeros = match zero_points {
            ZeroPoints::Default => vec![],
            ZeroPoints::Packed(z) => {
                let per_row = (self.blocks * self.bits).div_ceil(8);
                (0..self.n * self.blocks)
                    .map(|at| {
                        let (row, b) = (at / self.blocks, at % self.blocks);
                        self.code(&z[row * per_row..(row + 1) * per_row], b) as f32
                    })
                    .collect()
            }
            ZeroPoints::Float(z) => z.iter().map(|&v| v as f32).collect(),
        };
        Some(BlockCodes {
            format,
            codes: codes.iter().map(|&c| c as u8).collect(),
            scales: scales.iter().map(|&s| s as f32).collect(),
            zeros,
        })
    }
}

/// The values of an integer tensor (the importer checked that it is not float), read in place.
fn integers(t: &Tensor) -> &[i64] {
    t.as_i64().expect("an integer tensor")
}

enum ZeroPoints {
    /// None given: the middle code, `2^(bits-1)`.
    Default,
    /// Codes packed as the weight's are, `ceil(blocks * bits / 8)` bytes a row.
    Packed(Vec<i64>),
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
    if codes.dtype() != DType::I64 {
        return Err(cx.err(format!(
            "the quantized weight holds {}, expected uint8 codes",
            codes.dtype().name()
        )));
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
            if z.dtype() == DType::I64
                && z.numel() == n * (layout.blocks * layout.bits).div_ceil(8) =>
        {
            ZeroPoints::Packed(integers(&z).to_vec())
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
    let scales = scales.to_f64();
    // The codes stay as they are, on the device and on the host, where the values are computed
    // only if something reads them.
    let stored = layout
        .block_codes(integers(&codes), &scales, &zero_points)
        .ok_or_else(|| cx.err(format!("a weight of N = {n} by K = {k} is too large")))?;
    let stored = std::sync::Arc::new(stored);
    let w = BlockCodes::tensor(&stored, vec![k, n]);
    let name = cx.temp_name("weight");
    let w = cx.add_blocked_const(&name, w, Some(stored))?;
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

/// GatherBlockQuantized (com.microsoft): a Gather from a constant table of block-quantized
/// codes, a scale per block of `block_size` codes along `quantize_axis` and an optional zero
/// point per block. Two forms are written:
/// - uint8 bytes of 2-, 4- or 8-bit codes packed along the last axis, gathered along axis 0,
///   zero points packed the same way per row, else the middle code (MatMulNBits' conventions):
///   onnxruntime-genai's builder, for an int4 model's token embedding, often sharing its codes
///   with the LM head's MatMulNBits;
/// - int4 or uint4 codes (ONNX's 4-bit types), any gather and quantize axes, zero points of
///   the codes' type, else 0: ONNX Runtime's weight quantizer, for a quantized Gather.
///
/// The table becomes an f32 constant, which a plain Gather reads (and the id range check
/// guards, where onnxruntime gives zeros for ids past the table): computed from its codes when
/// read, where it keeps them (`ir::blocks`), else dequantized at import.
pub fn gather_block_quantized(cx: &mut Ctx) -> Result<NodeId> {
    let block = cx.attr_int("block_size")?.unwrap_or(128);
    if block < 16 || !(block as u64).is_power_of_two() {
        return Err(cx.err(format!(
            "block_size {block} is not a power of two of at least 16"
        )));
    }
    let block = block as usize;
    let data = cx.input(0)?;
    let packed_bytes = match cx.declared_type(data) {
        Some(DataType::Uint8) => true,
        Some(DataType::Int4 | DataType::Uint4) => false,
        other => {
            return Err(cx.err(format!(
                "the quantized table is {}, expected uint8, int4 or uint4 codes",
                other.map_or("a computed value".to_string(), |t| t
                    .as_str_name()
                    .to_lowercase())
            )))
        }
    };
    let bits = match (packed_bytes, cx.attr_int("bits")?.unwrap_or(4)) {
        (true, b @ (2 | 4 | 8)) | (false, b @ 4) => b as usize,
        (_, b) => {
            return Err(cx.err(format!(
                "bits is {b}, expected 2, 4 or 8 for uint8 codes, 4 for int4 and uint4"
            )))
        }
    };
    let codes = cx
        .const_input(0, "quantized table")?
        .ok_or_else(|| cx.err("the quantized table (input 0) is missing".into()))?;
    let rank = codes.shape.len();
    let axis = |name: &str, default: i64| -> Result<usize> {
        let a = cx.attr_int(name)?.unwrap_or(default);
        let a = if a < 0 { a + rank as i64 } else { a };
        usize::try_from(a)
            .ok()
            .filter(|&a| a < rank)
            .ok_or_else(|| cx.err(format!("{name} {a} is outside the table's {rank} axes")))
    };
    let (gather_axis, quantize_axis) = (axis("gather_axis", 0)?, axis("quantize_axis", 1)?);
    if packed_bytes && (gather_axis != 0 || quantize_axis + 1 != rank) {
        return Err(cx.err(format!(
            "uint8 codes are gathered along axis 0 and quantized along the last, not \
             gather_axis {gather_axis} and quantize_axis {quantize_axis}"
        )));
    }
    // The table's logical shape: uint8 bytes hold 8 / bits codes each along the last axis.
    let per_byte = if packed_bytes { 8 / bits } else { 1 };
    let mut logical = codes.shape.clone();
    logical[quantize_axis] *= per_byte;
    // [outer, axis, inner] around the quantized axis (outer: the slabs below), and its blocks.
    let (along, inner) = (
        logical[quantize_axis],
        logical[quantize_axis + 1..].iter().product::<usize>(),
    );
    let blocks = along.div_ceil(block);
    let mut want = logical.clone();
    want[quantize_axis] = blocks;
    let scales = cx
        .const_input(2, "scales")?
        .ok_or_else(|| cx.err("the scales (input 2) are missing".into()))?;
    if scales.shape != want || !scales.dtype().is_float() {
        return Err(cx.err(format!(
            "the scales are {} {}, expected floats of shape {} (the table's {} in blocks of \
             {block} along axis {quantize_axis})",
            scales.dtype().name(),
            shape_str(&scales.shape),
            shape_str(&want),
            shape_str(&logical)
        )));
    }
    // Zero points: per block, packed like the codes in uint8 bytes (a row of blocks each).
    let zero_bytes = (blocks * bits).div_ceil(8);
    let zero_points = cx.const_input(3, "zero points")?;
    if let Some(z) = &zero_points {
        let mut shape = want.clone();
        if packed_bytes {
            shape[quantize_axis] = zero_bytes;
        }
        if z.shape != shape || z.dtype() != DType::I64 {
            return Err(cx.err(format!(
                "the zero points are {} {}, expected codes of shape {}",
                z.dtype().name(),
                shape_str(&z.shape),
                shape_str(&shape)
            )));
        }
    }
    let layout = Layout {
        k: along,
        n: 1,
        bits,
        block,
        blocks,
    };
    let codes = integers(&codes);
    let scales = scales.to_f64();
    let zero_points = zero_points.as_ref().map(integers);
    let middle = if packed_bytes {
        f64::from(1u32 << (bits - 1))
    } else {
        0.0
    };
    // The table keeps its codes where `ir::blocks` describes them: the builder's uint8 form (a
    // line per row), a 2-D int4 or uint4 table gathered by rows.
    let stored = match packed_bytes {
        true => packed_table_codes(&layout, &logical, codes, &scales, zero_points),
        false => NibbleTable {
            shape: &logical,
            gather_axis,
            quantize_axis,
            block,
            signed: cx.declared_type(data) == Some(DataType::Int4),
        }
        .block_codes(codes, &scales, zero_points),
    };
    let name = cx.temp_name("table");
    if let Some(stored) = stored {
        let table = BlockCodes::tensor(&stored, logical);
        let table = cx.add_blocked_const(&name, table, Some(stored))?;
        return gather_table(cx, table, gather_axis);
    }
    let table = Tensor::f32_filled(logical, |table| {
        for (o, slab) in table.chunks_exact_mut(along * inner).enumerate() {
            for (a, line) in slab.chunks_exact_mut(inner).enumerate() {
                let b = a / block;
                for (n, v) in line.iter_mut().enumerate() {
                    let i = (o * along + a) * inner + n;
                    let at = (o * blocks + b) * inner + n;
                    let code = match packed_bytes {
                        true => layout.code(codes, i),
                        false => codes[i] as f64,
                    };
                    let zero = match zero_points {
                        None => middle,
                        // uint8: a row of `blocks` packed codes (inner is 1: the last axis).
                        Some(z) if packed_bytes => {
                            layout.code(&z[o * zero_bytes..(o + 1) * zero_bytes], b)
                        }
                        Some(z) => z[at] as f64,
                    };
                    // In f32, as a kernel decodes codes stored on the device.
                    *v = (code as f32 - zero as f32) * scales[at] as f32;
                }
            }
        }
    });
    let table = cx.add_const(&name, table)?;
    gather_table(cx, table, gather_axis)
}

/// The codes of a GatherBlockQuantized table of uint8 bytes (`layout`: codes along the last
/// axis of `shape`, a row of packed zero points per line), a line per row.
fn packed_table_codes(
    layout: &Layout,
    shape: &[usize],
    codes: &[i64],
    scales: &[f64],
    zero_points: Option<&[i64]>,
) -> Option<std::sync::Arc<BlockCodes>> {
    let (along, blocks) = (layout.k, layout.blocks);
    let format = BlockFormat::new(
        shape,
        layout.bits,
        layout.block,
        false,
        along,
        blocks,
        zero_points.is_some(),
    )?;
    let zero_bytes = (blocks * layout.bits).div_ceil(8);
    let zeros = zero_points.map_or(vec![], |z| {
        (0..numel(shape) / along * blocks)
            .map(|at| {
                let (o, b) = (at / blocks, at % blocks);
                layout.code(&z[o * zero_bytes..(o + 1) * zero_bytes], b) as f32
            })
            .collect()
    });
    Some(std::sync::Arc::new(BlockCodes {
        format,
        codes: codes.iter().map(|&c| c as u8).collect(),
        scales: scales.iter().map(|&s| s as f32).collect(),
        zeros,
    }))
}

/// A GatherBlockQuantized table of ONNX int4 or uint4 codes (one code an element), as ONNX
/// Runtime's quantizer writes it.
struct NibbleTable<'a> {
    shape: &'a [usize],
    gather_axis: usize,
    quantize_axis: usize,
    block: usize,
    signed: bool,
}

impl NibbleTable<'_> {
    /// The codes as the device may store them (`ir::blocks`), for a 2-D table gathered by rows
    /// and quantized along either axis: a line per row (blocks along the rows) or per column
    /// (blocks down the columns). int4 codes are stored offset by 8, as unsigned codes, with
    /// their zero points offset alike, so `(code - zero) * scale` is unchanged.
    fn block_codes(
        &self,
        codes: &[i64],
        scales: &[f64],
        zero_points: Option<&[i64]>,
    ) -> Option<std::sync::Arc<BlockCodes>> {
        let &[rows, cols] = self.shape else {
            return None;
        };
        if self.gather_axis != 0 {
            return None;
        }
        let down = self.quantize_axis == 0;
        let (lines, line_codes) = if down { (cols, rows) } else { (rows, cols) };
        let blocks = line_codes.div_ceil(self.block);
        let offset = if self.signed { 8 } else { 0 };
        // int4 without zero points is centred on the middle code; uint4 without, on 0.
        let with_zeros = zero_points.is_some() || !self.signed;
        let format = BlockFormat::new(
            self.shape, 4, self.block, down, line_codes, blocks, with_zeros,
        )?;
        // Element (line, at) of the table, and block (line, b) of the scales `[.., blocks, ..]`.
        let element = |line: usize, at: usize| {
            if down {
                at * cols + line
            } else {
                line * cols + at
            }
        };
        let block_at = |line: usize, b: usize| {
            if down {
                b * cols + line
            } else {
                line * blocks + b
            }
        };
        let mut packed = vec![0u8; format.code_bytes()];
        for line in 0..lines {
            for at in 0..line_codes {
                let bit = (line * line_codes + at) * 4;
                let code = (codes[element(line, at)] + offset) as u8 & 0xf;
                packed[bit / 8] |= code << (bit % 8);
            }
        }
        let per_block = |f: &dyn Fn(usize) -> f32| -> Vec<f32> {
            (0..lines * blocks)
                .map(|k| f(block_at(k / blocks, k % blocks)))
                .collect()
        };
        let zeros = match zero_points {
            Some(z) => per_block(&|k| (z[k] + offset) as f32),
            None if with_zeros => per_block(&|_| 0.0),
            None => vec![],
        };
        Some(std::sync::Arc::new(BlockCodes {
            format,
            codes: packed,
            scales: per_block(&|k| scales[k] as f32),
            zeros,
        }))
    }
}

/// GatherBlockQuantized's Gather from its dequantized `table`.
fn gather_table(cx: &mut Ctx, table: NodeId, axis: usize) -> Result<NodeId> {
    let ids = cx.input(1)?;
    if cx.dtype(ids).is_float() {
        return Err(cx.err("the indices (input 1) are floats, expected integers".into()));
    }
    cx.add(Op::Gather { axis }, &[table, ids])
}

/// The integer type a quantizer writes: its range, by the ONNX type of its zero point.
fn integer_range(cx: &Ctx, t: DataType) -> Result<(f32, f32)> {
    Ok(match t {
        DataType::Uint8 => (0.0, 255.0),
        DataType::Int8 => (-128.0, 127.0),
        DataType::Uint16 => (0.0, 65535.0),
        DataType::Int16 => (-32768.0, 32767.0),
        other => {
            return Err(cx.unsupported(format!(
                "{} to {}",
                cx.op_type(),
                other.as_str_name().to_lowercase()
            )))
        }
    })
}

/// `clip(round(x) (+ zero point), lo, hi)` as integers: round half to even, as ONNX does.
fn round_and_saturate(
    cx: &mut Ctx,
    x: NodeId,
    zero_point: Option<NodeId>,
    (lo, hi): (f32, f32),
    final_name: Option<&str>,
) -> Result<NodeId> {
    let mut q = tmp(cx, Op::Unary(unary::ROUND), &[x], "rounded")?;
    if let Some(z) = zero_point {
        let z = match cx.dtype(z) {
            DType::F32 => z,
            _ => tmp(cx, Op::Cast { to: DType::F32 }, &[z], "zero_point_float")?,
        };
        q = tmp(cx, Op::Binary(Binary::Add), &[q, z], "shifted")?;
    }
    let lo = constant(cx, lo, "lowest")?;
    let hi = constant(cx, hi, "highest")?;
    let q = tmp(cx, Op::Binary(Binary::Max), &[q, lo], "at_least_lowest")?;
    let q = tmp(cx, Op::Binary(Binary::Min), &[q, hi], "saturated")?;
    match final_name {
        Some(name) => cx.add_named(Op::Cast { to: DType::I64 }, &[q], name),
        None => cx.add(Op::Cast { to: DType::I64 }, &[q]),
    }
}

fn constant(cx: &mut Ctx, v: f32, tag: &str) -> Result<NodeId> {
    let name = cx.temp_name(tag);
    cx.add_const(&name, Tensor::scalar(v))
}

/// QuantizeLinear: `saturate(round(x / scale) + zero_point)`, per tensor, per axis or blocked,
/// into the zero point's integer type (uint8 without one; `output_dtype` may name it).
pub fn quantize_linear(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let scale = cx.input(1)?;
    let zp = cx.opt_input(2)?;
    let xs = cx.shape(x);
    let declared = zp.and_then(|z| cx.declared_type(z));
    let named = match cx.attr_int("output_dtype")? {
        None | Some(0) => None,
        Some(t) => Some(
            DataType::try_from(t as i32)
                .map_err(|_| cx.err(format!("output_dtype {t} is not an ONNX type")))?,
        ),
    };
    let target = match (named, declared, zp) {
        (Some(t), _, _) | (None, Some(t), _) => t,
        (None, None, None) => DataType::Uint8,
        (None, None, Some(_)) => {
            return Err(cx.unsupported(
                "QuantizeLinear with a computed zero point (its type is not known at import)"
                    .into(),
            ))
        }
    };
    // Saturation matters only for float8 targets, which are refused below.
    cx.attr_int("saturate")?;
    let range = integer_range(cx, target)?;
    let s = spread_quantization(cx, scale, &xs, "scale")?;
    let scaled = tmp(cx, Op::Binary(Binary::Div), &[x, s], "scaled")?;
    let z = match zp {
        Some(z) => Some(spread_quantization(cx, z, &xs, "zero_point")?),
        None => None,
    };
    round_and_saturate(cx, scaled, z, range, None)
}

/// DynamicQuantizeLinear: uint8 codes of x with the scale and zero point its own range gives
/// (the range widened to hold 0): `scale = (max - min) / 255`, `zero point = saturate(round(-min
/// / scale))`; outputs the codes, the scale and the zero point.
pub fn dynamic_quantize_linear(cx: &mut Ctx) -> Result<NodeId> {
    let x = cx.input(0)?;
    let all: Vec<usize> = (0..cx.shape(x).len()).collect();
    let reduce = |cx: &mut Ctx, kind: Reduce, tag: &str| {
        let op = Op::Reduce {
            kind,
            axes: all.clone(),
            keepdims: false,
        };
        tmp(cx, op, &[x], tag)
    };
    let (lo, hi) = (
        reduce(cx, Reduce::Min, "min")?,
        reduce(cx, Reduce::Max, "max")?,
    );
    let zero = constant(cx, 0.0, "zero")?;
    let lo = tmp(cx, Op::Binary(Binary::Min), &[lo, zero], "min_with_zero")?;
    let hi = tmp(cx, Op::Binary(Binary::Max), &[hi, zero], "max_with_zero")?;
    let levels = constant(cx, 255.0, "levels")?;
    let span = tmp(cx, Op::Binary(Binary::Sub), &[hi, lo], "span")?;
    let out = |i: usize| cx.node.output.get(i).filter(|o| !o.is_empty()).cloned();
    let scale_name = out(1).unwrap_or_else(|| cx.temp_name("scale"));
    let scale = cx.add_named(Op::Binary(Binary::Div), &[span, levels], &scale_name)?;
    let neg = tmp(cx, Op::Unary(unary::NEG), &[lo], "minus_min")?;
    let zp_float = tmp(
        cx,
        Op::Binary(Binary::Div),
        &[neg, scale],
        "zero_point_float",
    )?;
    let zp_name = out(2).unwrap_or_else(|| cx.temp_name("zero_point"));
    let zp = round_and_saturate(cx, zp_float, None, (0.0, 255.0), Some(&zp_name))?;
    cx.set_output(1, scale);
    cx.set_output(2, zp);
    let scaled = tmp(cx, Op::Binary(Binary::Div), &[x, scale], "scaled")?;
    round_and_saturate(cx, scaled, Some(zp), (0.0, 255.0), None)
}

/// `v - zero point` as floats. A 1-D zero point of more than one value broadcasts along the
/// last dim (B's columns of MatMulInteger), or with `rows = Some(r)` is one per row: laid out as
/// `[len, 1, ...]` of rank `r` (A's rows: r = 2, matching A's last two dims; W's output
/// channels of ConvInteger: W's rank).
fn centered(
    cx: &mut Ctx,
    v: NodeId,
    zp: Option<NodeId>,
    rows: Option<usize>,
    tag: &str,
) -> Result<NodeId> {
    let vf = tmp(
        cx,
        Op::Cast { to: DType::F32 },
        &[v],
        &format!("{tag}_float"),
    )?;
    let Some(z) = zp else {
        return Ok(vf);
    };
    let mut z = tmp(
        cx,
        Op::Cast { to: DType::F32 },
        &[z],
        &format!("{tag}_zero_point"),
    )?;
    let zs = cx.shape(z);
    if let (Some(rank), [len]) = (rows, zs.as_slice()) {
        let mut shape = vec![1; rank];
        shape[0] = *len;
        z = tmp(
            cx,
            Op::Reshape { shape },
            &[z],
            &format!("{tag}_zero_point_rows"),
        )?;
    }
    tmp(
        cx,
        Op::Binary(Binary::Sub),
        &[vf, z],
        &format!("{tag}_centered"),
    )
}

/// ConvInteger: the Conv of `x - x_zero_point` and `w - w_zero_point` (one value, or one per
/// output channel) in int32, computed in f32 as [`matmul_integer`] is; the padding reads 0 of
/// the centered input, as ONNX defines it.
pub fn conv_integer(cx: &mut Ctx) -> Result<NodeId> {
    let (x, w) = (cx.input(0)?, cx.input(1)?);
    let (zx, zw) = (cx.opt_input(2)?, cx.opt_input(3)?);
    let x = centered(cx, x, zx, None, "x")?;
    let rank = cx.shape(w).len();
    let w = centered(cx, w, zw, Some(rank), "w")?;
    let name = cx.temp_name("conv");
    let y = super::conv::conv_of(cx, x, w, None, Some(&name))?;
    cx.add(Op::Cast { to: DType::I64 }, &[y])
}

/// MatMulInteger: `(A - a_zero_point) @ (B - b_zero_point)` in int32, computed in f32 (exact
/// while partial sums stay under 2^24, some 250 products of full-range 8-bit codes; beyond, off
/// by f32's rounding of the sum, which the dequantizing scale that follows makes a relative
/// 6e-8). A's zero point is one value or one per row, B's one value or one per column.
pub fn matmul_integer(cx: &mut Ctx) -> Result<NodeId> {
    let a = cx.input(0)?;
    let b = cx.input(1)?;
    let (za, zb) = (cx.opt_input(2)?, cx.opt_input(3)?);
    let a = centered(cx, a, za, Some(2), "a")?;
    let b = centered(cx, b, zb, None, "b")?;
    let product = tmp(cx, Op::MatMul, &[a, b], "product")?;
    cx.add(Op::Cast { to: DType::I64 }, &[product])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{quantize_nbits, Quantized, ZeroPointForm};

    fn dequantized(q: &Quantized, layout: &Layout, form: ZeroPointForm) -> Vec<f32> {
        let codes: Vec<i64> = q.codes.iter().map(|&c| i64::from(c)).collect();
        let zero = match form {
            ZeroPointForm::Middle => ZeroPoints::Default,
            ZeroPointForm::Packed => {
                ZeroPoints::Packed(q.zero_codes.iter().map(|&c| i64::from(c)).collect())
            }
            ZeroPointForm::Float => ZeroPoints::Float(q.zero_floats.clone()),
        };
        layout
            .block_codes(&codes, &q.scales, &zero)
            .unwrap()
            .dequantize()
    }

    /// Every form and width: the codes read back (by the importer's dequantization) within half
    /// a step of each value (a step for the value a symmetric range clips), and a weight that
    /// already is a dequantized one quantizes to the same codes and scales (what re-quantizing
    /// an unchanged layer of a quantized model gives). k = 40 leaves the last block short.
    /// ONNX int4 and uint4 tables, quantized along either axis, with and without zero points,
    /// keep codes that decode to the importer's values: `(code - zero) * scale` in f32.
    #[test]
    fn nibble_tables_keep_codes_that_decode_to_the_table() {
        let (rows, cols, block): (usize, usize, usize) = (20, 36, 16);
        for (signed, axis, zeros) in [
            (true, 1, false),
            (true, 0, true),
            (false, 1, true),
            (false, 0, false),
        ] {
            let codes: Vec<i64> = (0..rows * cols)
                .map(|i| (i * 7 % 16) as i64 - if signed { 8 } else { 0 })
                .collect();
            let (lines, along) = if axis == 0 {
                (cols, rows)
            } else {
                (rows, cols)
            };
            let blocks = along.div_ceil(block);
            let scales: Vec<f64> = (0..lines * blocks)
                .map(|k| 0.01 * (k as f64 - 9.5))
                .collect();
            let z: Vec<i64> = (0..lines * blocks)
                .map(|k| (k % 5) as i64 - if signed { 2 } else { 0 })
                .collect();
            let table = NibbleTable {
                shape: &[rows, cols],
                gather_axis: 0,
                quantize_axis: axis,
                block,
                signed,
            };
            let stored = table
                .block_codes(&codes, &scales, zeros.then_some(&z[..]))
                .unwrap();
            for (i, &code) in codes.iter().enumerate() {
                let (r, c) = (i / cols, i % cols);
                // Scales and zero points `[rows, blocks]` or `[blocks, cols]`, as the file has them.
                let k = if axis == 0 {
                    r / block * cols + c
                } else {
                    r * blocks + c / block
                };
                let zero = if zeros { z[k] as f32 } else { 0.0 };
                let want = (code as f32 - zero) * scales[k] as f32;
                assert_eq!(
                    stored.value(i).to_bits(),
                    want.to_bits(),
                    "{signed} {axis} {i}"
                );
            }
        }
    }

    #[test]
    fn quantized_weights_read_back_within_half_a_step() {
        let mut rng = crate::tensor::Rng::new(3);
        let (k, n) = (40, 6);
        let w: Vec<f32> = (0..k * n).map(|_| rng.normal() as f32).collect();
        let f32_store = |x: f64| x as f32 as f64;
        for form in [
            ZeroPointForm::Middle,
            ZeroPointForm::Packed,
            ZeroPointForm::Float,
        ] {
            for (bits, block) in [(4, 16), (4, 32), (8, 16), (2, 32)] {
                let layout = Layout {
                    k,
                    n,
                    bits,
                    block,
                    blocks: k.div_ceil(block),
                };
                let q = quantize_nbits(&w, (k, n), (bits, block), form, f32_store);
                let back = dequantized(&q, &layout, form);
                let limit = if form == ZeroPointForm::Middle {
                    1.0
                } else {
                    0.5
                };
                assert!(
                    q.max_steps <= limit + 1e-6,
                    "{form:?} {bits}/{block}: {}",
                    q.max_steps
                );
                for (i, (a, b)) in w.iter().zip(&back).enumerate() {
                    let scale = q.scales[(i % n) * layout.blocks + (i / n) / block].abs();
                    assert!(
                        f64::from((a - b).abs()) <= limit * scale * (1.0 + 1e-5) + 1e-7,
                        "{form:?} {bits}/{block} element {i}: {a} read back as {b} (scale {scale})"
                    );
                }
                let again = quantize_nbits(&back, (k, n), (bits, block), form, f32_store);
                assert_eq!(again.codes, q.codes, "{form:?} {bits}/{block}");
                assert_eq!(again.zero_codes, q.zero_codes, "{form:?} {bits}/{block}");
                for (a, b) in again.scales.iter().zip(&q.scales) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs(),
                        "{form:?} {bits}/{block}: {a} {b}"
                    );
                }
            }
        }
    }
}
