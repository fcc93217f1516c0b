//! Weights kept on the device in the block-quantized codes a model stores them in.
//!
//! A quantized model (`MatMulNBits`, `GatherBlockQuantized`) stores a weight as 2-, 4- or 8-bit
//! codes with a scale, and maybe a zero point, per block of codes; `--storage int4|int8` makes
//! such codes of an f32 model's weights ([`quantize_nbits`]). The weight is an f32 constant to
//! every pass and to the reference executor, its values computed from the codes when first read
//! ([`BlockCodes::tensor`]); the constant also keeps the codes (`Graph::blocked`), so that the
//! planner can put the codes on the device instead of the f32 values: 4-bit codes with a scale
//! per 32 take 5 bits a weight (6 with zero points), not 32. Kernels decode each weight as they
//! load it, with f32 arithmetic that gives the constant's value bit for bit
//! ([`BlockCodes::value`] is the device's formula).
//!
//! The codes of a `[.., cols]` constant run in *lines*: down its columns (MatMulNBits keeps the
//! `[K, N]` weight's codes as `[N, K]` rows, a line per output column) or along its rows (an
//! embedding table, a line per token). A line holds `line_codes` codes (a last block may be
//! padded) in `blocks` blocks of `block`. That is how the host keeps them (the file's bytes);
//! the device gets them re-packed in the constant's row-major order, without padding, and the
//! scales row-major over (block row, column) where blocks run down the columns
//! ([`BlockCodes::device_words`]): a matmul's lanes read a row's neighbouring columns, which then
//! share words (a QDoRA step of a 0.5B model at 16 tokens went from 1.75 to 1.46 s a step).

use crate::tensor::{numel, Data, F32Buf, Tensor};
use std::sync::Arc;

/// The layout of a block-quantized constant: what a kernel needs to decode its elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockFormat {
    /// Bits a code: 2, 4 or 8 (a code never straddles a 32-bit word).
    pub bits: u32,
    /// Codes a block.
    pub block: u32,
    /// The constant's last dim: element `i` is at row `i / cols`, column `i % cols`.
    pub cols: u32,
    /// Lines run down the columns (line `c` holds column `c`), else along the rows.
    pub down_columns: bool,
    /// How many lines.
    pub lines: u32,
    /// Values a line holds: the constant's rows when lines run down its columns, else `cols`.
    pub line_len: u32,
    /// Codes a line, padding included.
    pub line_codes: u32,
    /// Blocks a line.
    pub blocks: u32,
    /// Each block has its own zero point; else every block's is the middle code, 2^(bits-1).
    pub zero_points: bool,
}

/// A constant's codes, scales and zero points, in [`BlockFormat`]'s layout.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockCodes {
    pub format: BlockFormat,
    /// `lines * line_codes` codes, packed from the low bits of each byte up.
    pub codes: Vec<u8>,
    /// A scale a block, `[lines, blocks]`.
    pub scales: Vec<f32>,
    /// A zero point a block, `[lines, blocks]` (empty without `zero_points`), as a float: an
    /// integer code, or a float zero point as the file gives it.
    pub zeros: Vec<f32>,
}

impl BlockFormat {
    /// A layout of `lines` lines for a constant of `shape`, when the pieces fit together; else
    /// `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shape: &[usize],
        bits: usize,
        block: usize,
        down_columns: bool,
        line_codes: usize,
        blocks: usize,
        zero_points: bool,
    ) -> Option<Self> {
        let cols = *shape.last()?;
        let len = numel(shape);
        let lines = match down_columns {
            true if shape.len() == 2 => cols,
            false if cols > 0 => len / cols,
            _ => return None,
        };
        let line_len = len.checked_div(lines).unwrap_or(0);
        let fits = matches!(bits, 2 | 4 | 8)
            && block > 0
            && line_codes >= line_len
            && blocks == line_codes.div_ceil(block);
        if !fits {
            return None;
        }
        let u = |v: usize| u32::try_from(v).ok();
        Some(BlockFormat {
            bits: bits as u32,
            block: u(block)?,
            cols: u(cols)?,
            down_columns,
            lines: u(lines)?,
            line_len: u(line_len)?,
            line_codes: u(line_codes)?,
            blocks: u(blocks)?,
            zero_points,
        })
    }

    /// Whether kernels can index the device buffer: every code's bit offset and every word fit
    /// in a u32. Else the planner stores the constant as f32 (which it then splits).
    pub fn indexable(&self) -> bool {
        self.elements() as u64 * self.bits as u64 <= u32::MAX as u64
            && self.words() <= u32::MAX as u64
    }

    /// Bytes of packed codes.
    pub fn code_bytes(&self) -> usize {
        (self.lines as usize * self.line_codes as usize * self.bits as usize).div_ceil(8)
    }

    /// Elements of the constant.
    pub fn elements(&self) -> usize {
        self.lines as usize * self.line_len as usize
    }

    /// 32-bit words of the device buffer: the codes in the constant's row-major order (no
    /// padding; the last word padded), then the scales, then the zero points.
    pub fn words(&self) -> u64 {
        let per_block = 1 + u64::from(self.zero_points);
        self.scales_at() + per_block * self.lines as u64 * self.blocks as u64
    }

    /// Word offset of the scales in the device buffer.
    pub fn scales_at(&self) -> u64 {
        (self.elements() as u64 * self.bits as u64).div_ceil(32)
    }

    /// Word offset of the zero points in the device buffer.
    pub fn zeros_at(&self) -> u64 {
        self.scales_at() + self.lines as u64 * self.blocks as u64
    }

    /// Where the device keeps element `i`'s scale (and zero point), from the start of the
    /// scales: row-major over (block row, column) when lines run down the columns, so that a
    /// row's consecutive columns read consecutive words; else over (row, block).
    pub fn device_block(&self, i: usize) -> usize {
        let (cols, block) = (self.cols as usize, self.block as usize);
        match self.down_columns {
            true => i / (cols * block) * cols + i % cols,
            false => i / cols * self.blocks as usize + i % cols / block,
        }
    }

    /// Element `i`'s line and its position in the line.
    pub fn line_of(&self, i: usize) -> (usize, usize) {
        let (row, col) = (i / self.cols as usize, i % self.cols as usize);
        match self.down_columns {
            true => (col, row),
            false => (row, col),
        }
    }

    /// A short name for plans: "4-bit blocks of 32".
    pub fn name(&self) -> String {
        format!("{}-bit blocks of {}", self.bits, self.block)
    }
}

impl BlockCodes {
    /// Element `i`'s value as a kernel decodes it: `(code - zero) * scale` in f32.
    pub fn value(&self, i: usize) -> f32 {
        let f = &self.format;
        let (line, at) = f.line_of(i);
        let code = self.code(i);
        let b = line * f.blocks as usize + at / f.block as usize;
        let zero = match f.zero_points {
            true => self.zeros[b],
            false => (1u32 << (f.bits - 1)) as f32,
        };
        (code as f32 - zero) * self.scales[b]
    }

    /// The f32 constant of `shape` (as many elements as the format covers) whose values these
    /// codes decode to, computed when first read (`F32Buf::Lazy`): the device reads the codes,
    /// so a host that reads no values (inference) never holds them.
    pub fn tensor(codes: &Arc<BlockCodes>, shape: Vec<usize>) -> Tensor {
        let codes = Arc::clone(codes);
        Tensor {
            data: Data::F32(F32Buf::lazy(numel(&shape), move || codes.dequantize())),
            shape,
        }
    }

    /// Every value, row-major, on every thread: the same arithmetic as [`value`](Self::value),
    /// a table of each block's 2^bits values at a time.
    pub fn dequantize(&self) -> Vec<f32> {
        let f = &self.format;
        let (cols, lines) = (f.cols as usize, f.lines as usize);
        let line_len = f.line_len as usize;
        let mut out = vec![0f32; lines * line_len];
        if out.is_empty() {
            return out;
        }
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        if !f.down_columns {
            // Each line is one run of `cols` values.
            let per = lines.div_ceil(threads).max(1);
            std::thread::scope(|scope| {
                for (t, part) in out.chunks_mut(per * cols.max(1)).enumerate() {
                    scope.spawn(move || {
                        for (l, run) in part.chunks_mut(cols).enumerate() {
                            self.decode_line(t * per + l, 0, run);
                        }
                    });
                }
            });
            return out;
        }
        // Lines are columns: each thread takes a run of rows (whole blocks), decodes a tile of
        // lines' segments, then writes them out along the rows.
        const TILE: usize = 64;
        let rows = line_len;
        let per = rows
            .div_ceil(threads)
            .next_multiple_of(f.block as usize)
            .max(1);
        std::thread::scope(|scope| {
            for (t, part) in out.chunks_mut(per * cols).enumerate() {
                scope.spawn(move || {
                    let first = t * per;
                    let n = part.len() / cols;
                    let mut tile = vec![0f32; TILE * n];
                    for c0 in (0..lines).step_by(TILE) {
                        let width = TILE.min(lines - c0);
                        for (j, seg) in tile.chunks_exact_mut(n).take(width).enumerate() {
                            self.decode_line(c0 + j, first, seg);
                        }
                        for (r, row) in part.chunks_exact_mut(cols).enumerate() {
                            for (j, v) in row[c0..c0 + width].iter_mut().enumerate() {
                                *v = tile[j * n + r];
                            }
                        }
                    }
                });
            }
        });
        out
    }

    /// Codes `from..from + out.len()` of line `line`, decoded into `out`.
    fn decode_line(&self, line: usize, from: usize, out: &mut [f32]) {
        let f = &self.format;
        let (bits, block) = (f.bits as usize, f.block as usize);
        let mask = (1u32 << bits) - 1;
        let first_bit = line * f.line_codes as usize * bits;
        let (mut at, mut written) = (from, 0);
        while written < out.len() {
            let b = at / block;
            let end = ((b + 1) * block).min(from + out.len());
            let k = line * f.blocks as usize + b;
            let zero = match f.zero_points {
                true => self.zeros[k],
                false => (1u32 << (bits - 1)) as f32,
            };
            let scale = self.scales[k];
            let lut: Vec<f32> = (0..=mask).map(|c| (c as f32 - zero) * scale).collect();
            for (i, v) in (at..end).zip(&mut out[written..]) {
                let bit = first_bit + i * bits;
                *v = lut[((self.codes[bit / 8] >> (bit % 8)) as u32 & mask) as usize];
            }
            written += end - at;
            at = end;
        }
    }

    /// Whether these codes decode to exactly `values` (the constant's, row-major), bit for bit.
    pub fn decodes_to(&self, values: &[f32]) -> bool {
        let f = &self.format;
        let lines = f.lines as usize * f.blocks as usize;
        self.codes.len() == f.code_bytes()
            && self.scales.len() == lines
            && self.zeros.len() == if f.zero_points { lines } else { 0 }
            && (values.iter().enumerate()).all(|(i, v)| self.value(i).to_bits() == v.to_bits())
    }

    /// The codes of lines `first..first + count` alone: a chunk of the constant cut along its
    /// lines (its columns when they run down them, else its rows), as the split pass cuts
    /// constants over the device's binding size. `None` where a line is not whole bytes.
    pub fn lines(&self, first: usize, count: usize) -> Option<BlockCodes> {
        let f = &self.format;
        let line_bits = f.line_codes as usize * f.bits as usize;
        if !line_bits.is_multiple_of(8) || first + count > f.lines as usize {
            return None;
        }
        let per_line = f.blocks as usize;
        let blocks = |v: &[f32]| match v.is_empty() {
            true => vec![],
            false => v[first * per_line..(first + count) * per_line].to_vec(),
        };
        let bytes = line_bits / 8;
        Some(BlockCodes {
            format: BlockFormat {
                lines: u32::try_from(count).ok()?,
                cols: if f.down_columns {
                    u32::try_from(count).ok()?
                } else {
                    f.cols
                },
                ..*f
            },
            codes: self.codes[first * bytes..(first + count) * bytes].to_vec(),
            scales: blocks(&self.scales),
            zeros: blocks(&self.zeros),
        })
    }

    /// The codes of the transposed matrix (a 2-D constant's): the same lines, read the other
    /// way (lines down the columns become lines along the rows, and back).
    pub fn transposed(&self) -> BlockCodes {
        let f = &self.format;
        BlockCodes {
            format: BlockFormat {
                down_columns: !f.down_columns,
                cols: if f.down_columns { f.line_len } else { f.lines },
                ..*f
            },
            ..self.clone()
        }
    }

    /// The buffer a kernel reads, as words (see [`BlockFormat::words`]).
    pub fn device_words(&self) -> Vec<u32> {
        let f = &self.format;
        let (bits, len) = (f.bits as usize, f.elements());
        let mut words = vec![0u32; f.words() as usize];
        let (codes, rest) = words.split_at_mut(f.scales_at() as usize);
        // The codes, re-packed in row-major order: rows on every thread where each row starts
        // a word, else on one.
        let (rows, cols) = (len / (f.cols as usize).max(1), f.cols as usize);
        let row_words = cols * bits / 32;
        if !f.down_columns && f.line_codes == f.cols {
            // Unpadded lines along the rows: the host's codes are already in row-major order.
            for (word, b) in codes.iter_mut().zip(self.codes.chunks(4)) {
                *word = (b.iter().rev()).fold(0u32, |w, &byte| w << 8 | byte as u32);
            }
        } else if cols * bits % 32 == 0 && row_words > 0 {
            let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
            // Whole words of rows a thread, for the transposing path.
            let per = rows.div_ceil(threads).next_multiple_of(32 / bits).max(1);
            std::thread::scope(|scope| {
                for (t, part) in codes.chunks_mut(per * row_words).enumerate() {
                    scope.spawn(move || match self.transposable() {
                        true => self.pack_tiles(t * per, part),
                        false => self.pack_rows(t * per, part),
                    });
                }
            });
        } else {
            self.pack_rows(0, codes);
        }
        // Scales and zero points, each at `device_block` of its elements.
        let blocks = f.lines as usize * f.blocks as usize;
        let (scales, zeros) = rest.split_at_mut(blocks);
        for (line, at) in
            (0..f.lines as usize).flat_map(|l| (0..f.blocks as usize).map(move |b| (l, b)))
        {
            let k = line * f.blocks as usize + at;
            let d = match f.down_columns {
                true => at * f.cols as usize + line,
                false => k,
            };
            scales[d] = self.scales[k].to_bits();
            if f.zero_points {
                zeros[d] = self.zeros[k].to_bits();
            }
        }
        words
    }

    /// Whether [`pack_tiles`](Self::pack_tiles) applies: lines down the columns, each line and
    /// each row of the constant a whole number of words.
    fn transposable(&self) -> bool {
        let f = &self.format;
        let bits = f.bits as usize;
        f.down_columns
            && (f.line_codes as usize * bits).is_multiple_of(32)
            && (f.cols as usize * bits).is_multiple_of(32)
    }

    /// [`pack_rows`](Self::pack_rows) a tile of `p = 32 / bits` lines by `p` rows at a time: a
    /// word of each line holds a column's `p` codes of the tile's rows, and the tile's rows are
    /// `p` words, so the tile is a `p` x `p` transpose of codes in registers (`first` a
    /// multiple of `p`; lines padded to whole blocks, so a tile never reads past its line).
    fn pack_tiles(&self, first: usize, words: &mut [u32]) {
        let f = &self.format;
        let (bits, cols) = (f.bits as usize, f.cols as usize);
        let (p, mask) = (32 / bits, (1u32 << bits) - 1);
        let row_words = cols / p;
        let rows = (words.len() / row_words.max(1)).min(f.elements() / cols.max(1) - first);
        let line_words = f.line_codes as usize / p;
        let word_at = |i: usize| {
            let b = &self.codes[4 * i..4 * i + 4];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        let mut src = [0u32; 16];
        for r0 in (0..rows).step_by(p) {
            let tile_rows = p.min(rows - r0);
            for c0 in (0..cols).step_by(p) {
                for (j, s) in src.iter_mut().take(p).enumerate() {
                    *s = word_at((c0 + j) * line_words + (first + r0) / p);
                }
                for i in 0..tile_rows {
                    let shift = bits * i;
                    let w = (src.iter().take(p).enumerate())
                        .fold(0u32, |w, (j, s)| w | ((s >> shift) & mask) << (bits * j));
                    words[(r0 + i) * row_words + c0 / p] = w;
                }
            }
        }
    }

    /// The codes of rows `first..` packed in row-major order into `words` (which starts with
    /// row `first`), as many rows as it holds.
    fn pack_rows(&self, first: usize, words: &mut [u32]) {
        let f = &self.format;
        let (bits, cols) = (f.bits as usize, f.cols as usize);
        let (line_codes, mask) = (f.line_codes as usize, (1u32 << bits) - 1);
        let rows = words.len() * 32 / (bits * cols).max(1);
        let rows = rows.min(f.elements() / cols.max(1) - first);
        // Where lines run down the columns, tiles of 16 rows: a tile reads a few bytes of each
        // line in turn and writes 16 rows at once, not a line's byte per row. Lines along the
        // rows are read as they lie.
        let tile = if f.down_columns { 16 } else { 1 };
        for r0 in (first..first + rows).step_by(tile) {
            for c in 0..cols {
                for r in r0..(r0 + tile).min(first + rows) {
                    let (line, at) = match f.down_columns {
                        true => (c, r),
                        false => (r, c),
                    };
                    let from = (line * line_codes + at) * bits;
                    let code = (self.codes[from / 8] >> (from % 8)) as u32 & mask;
                    let to = ((r - first) * cols + c) * bits;
                    words[to / 32] |= code << (to % 32);
                }
            }
        }
    }

    /// Element `i`'s code.
    fn code(&self, i: usize) -> u32 {
        let f = &self.format;
        let (line, at) = f.line_of(i);
        let bit = (line * f.line_codes as usize + at) * f.bits as usize;
        (self.codes[bit / 8] >> (bit % 8)) as u32 & ((1 << f.bits) - 1)
    }
}

/// How a MatMulNBits node gives its zero points: re-quantizing a weight keeps the form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroPointForm {
    /// None: every block's zero point is the middle code, so its range is symmetric.
    Middle,
    /// uint8 codes, packed as the weight's are.
    Packed,
    /// One float a block.
    Float,
}

/// A `[k, n]` weight quantized into MatMulNBits' layout (see [`quantize_nbits`]).
pub struct Quantized {
    /// `[n, blocks, block * bits / 8]`.
    pub codes: Vec<u8>,
    /// `n * blocks`, as stored (rounded by the caller's `store`).
    pub scales: Vec<f64>,
    /// Packed codes (`n * ceil(blocks * bits / 8)` bytes) or floats (`n * blocks`), by the form.
    pub zero_codes: Vec<u8>,
    pub zero_floats: Vec<f64>,
    /// The largest `|w - dequantized w|`, in steps of its block's scale: 0.5 at most, but where
    /// a symmetric block's code range clips its largest positive value (1 step at most).
    pub max_steps: f64,
    /// The largest `|w - dequantized w|`.
    pub max_abs: f64,
}

/// Quantizes `w` (`[k, n]` row-major, as MatMul reads it) to `bits`-bit codes in blocks of
/// `block` along k, rounding to nearest as ONNX Runtime's weight quantizer does: a block's range
/// is stretched to include 0 and spread over the codes, with a zero point per block
/// (`Packed`, `Float`); or its largest magnitude is the code 0 around the middle code
/// (`Middle`, symmetric). `store` rounds a scale or float zero point to the type it is stored
/// in, so that the codes are chosen for the values that will be read.
pub fn quantize_nbits(
    w: &[f32],
    (k, n): (usize, usize),
    (bits, block): (usize, usize),
    form: ZeroPointForm,
    store: impl Fn(f64) -> f64,
) -> Quantized {
    let (blocks, blob) = (k.div_ceil(block), block * bits / 8);
    let top = f64::from((1u32 << bits) - 1);
    let middle = f64::from(1u32 << (bits - 1));
    let zero_bytes = (blocks * bits).div_ceil(8);
    let mut out = Quantized {
        codes: vec![0; n * blocks * blob],
        scales: vec![0.0; n * blocks],
        zero_codes: vec![
            0;
            if form == ZeroPointForm::Packed {
                n * zero_bytes
            } else {
                0
            }
        ],
        zero_floats: vec![
            0.0;
            if form == ZeroPointForm::Float {
                n * blocks
            } else {
                0
            }
        ],
        max_steps: 0.0,
        max_abs: 0.0,
    };
    let put = |bytes: &mut [u8], i: usize, code: u8| {
        let bit = i * bits;
        bytes[bit / 8] |= code << (bit % 8);
    };
    for row in 0..n {
        for b in 0..blocks {
            let at = row * blocks + b;
            let ks = b * block..((b + 1) * block).min(k);
            let values = || ks.clone().map(|kk| f64::from(w[kk * n + row]));
            let (scale, zero) = match form {
                ZeroPointForm::Middle => {
                    let extreme =
                        values().fold(0.0, |e: f64, v| if v.abs() > e.abs() { v } else { e });
                    (store(extreme / -middle), middle)
                }
                ZeroPointForm::Packed | ZeroPointForm::Float => {
                    let lo = values().fold(0.0, f64::min);
                    let hi = values().fold(0.0, f64::max);
                    let scale = store((hi - lo) / top);
                    let zero = if scale == 0.0 { 0.0 } else { -lo / scale };
                    match form {
                        ZeroPointForm::Packed => (scale, zero.round().clamp(0.0, top)),
                        _ => (scale, store(zero)),
                    }
                }
            };
            out.scales[at] = scale;
            match form {
                ZeroPointForm::Packed => {
                    let row_bytes = &mut out.zero_codes[row * zero_bytes..(row + 1) * zero_bytes];
                    put(row_bytes, b, zero as u8);
                }
                ZeroPointForm::Float => out.zero_floats[at] = zero,
                ZeroPointForm::Middle => {}
            }
            let inverse = if scale == 0.0 { 0.0 } else { 1.0 / scale };
            let bytes = &mut out.codes[at * blob..(at + 1) * blob];
            for (j, v) in values().enumerate() {
                let code = (v * inverse + zero).round().clamp(0.0, top);
                put(bytes, j, code as u8);
                let error = (v - (code - zero) * scale).abs();
                out.max_abs = out.max_abs.max(error);
                if scale != 0.0 {
                    out.max_steps = out.max_steps.max(error / scale.abs());
                }
            }
            // The block's codes past k stay 0, as ONNX Runtime's quantizer leaves them.
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Rng;

    fn random(
        rng: &mut Rng,
        shape: [usize; 2],
        bits: usize,
        block: usize,
        down: bool,
    ) -> BlockCodes {
        let (lines, len) = if down {
            (shape[1], shape[0])
        } else {
            (shape[0], shape[1])
        };
        let blocks = len.div_ceil(block);
        let format = BlockFormat::new(&shape, bits, block, down, blocks * block, blocks, down)
            .expect("a layout that fits");
        let per_block = lines * blocks;
        BlockCodes {
            format,
            codes: (0..format.code_bytes())
                .map(|_| rng.range(0.0, 256.0) as u8)
                .collect(),
            scales: (0..per_block)
                .map(|_| rng.range(-1.0, 1.0) as f32)
                .collect(),
            zeros: match down {
                true => (0..per_block).map(|_| rng.range(0.0, 3.0) as f32).collect(),
                false => vec![],
            },
        }
    }

    /// The host's dequantization, tiles and threads and all, gives what a kernel decodes, for
    /// lines down columns (more than a tile of them, rows not a whole number of blocks) and
    /// along rows; a chunk of lines gives its part of the whole.
    #[test]
    fn dequantize_gives_each_value_as_decoded() {
        let mut rng = Rng::new(5);
        for (shape, bits, block, down) in [
            ([100, 70], 4, 16, true),
            ([33, 130], 2, 32, true),
            ([37, 45], 8, 16, false),
            ([5, 64], 4, 32, false),
        ] {
            let codes = random(&mut rng, shape, bits, block, down);
            let want: Vec<f32> = (0..shape[0] * shape[1]).map(|i| codes.value(i)).collect();
            let got = codes.dequantize();
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| g.to_bits() == w.to_bits()),
                "{shape:?}"
            );
            assert!(codes.decodes_to(&want));
            let (first, count) = (3, 2);
            let part = codes.lines(first, count).unwrap().dequantize();
            let whole = |r: usize, c: usize| want[r * shape[1] + c];
            let expected: Vec<f32> = match down {
                true => (0..shape[0])
                    .flat_map(|r| (first..first + count).map(move |c| (r, c)))
                    .map(|(r, c)| whole(r, c))
                    .collect(),
                false => (first..first + count)
                    .flat_map(|r| (0..shape[1]).map(move |c| (r, c)))
                    .map(|(r, c)| whole(r, c))
                    .collect(),
            };
            assert_eq!(
                part,
                expected,
                "{shape:?}: lines {first}..{}",
                first + count
            );
            let t = codes.transposed().dequantize();
            let (rows, cols) = (shape[0], shape[1]);
            assert!((0..rows * cols).all(|i| t[(i % cols) * rows + i / cols] == want[i]));
        }
    }

    /// The device's row-major codes, packed by tiles where lines and rows are whole words and
    /// by rows elsewhere, hold each element's code at bit `i * bits`; scales and zero points sit
    /// at `device_block`.
    #[test]
    fn device_words_hold_each_code_in_row_major_order() {
        let mut rng = Rng::new(11);
        for (shape, bits, block, down) in [
            ([100, 72], 4, 16, true),
            ([70, 48], 2, 32, true),
            ([37, 44], 8, 16, true),
            ([33, 20], 4, 16, true),
            ([37, 45], 8, 16, false),
            ([37, 64], 4, 32, false),
        ] {
            let codes = random(&mut rng, shape, bits, block, down);
            let f = &codes.format;
            let words = codes.device_words();
            for i in 0..shape[0] * shape[1] {
                let bit = i * bits;
                let got = (words[bit / 32] >> (bit % 32)) & ((1 << bits) - 1);
                assert_eq!(got, codes.code(i), "{shape:?} element {i}");
                let (line, at) = f.line_of(i);
                let k = line * f.blocks as usize + at / block;
                let d = f.scales_at() as usize + f.device_block(i);
                assert_eq!(
                    words[d],
                    codes.scales[k].to_bits(),
                    "{shape:?} scale of {i}"
                );
            }
        }
    }

    /// Layouts the device cannot index (a code's bit offset past u32) stay codes on the host
    /// only: the planner stores them as f32.
    #[test]
    fn oversized_layouts_are_not_indexable() {
        let big = BlockFormat::new(&[1 << 16, 1 << 14], 8, 32, true, 1 << 16, 1 << 11, false);
        assert!(!big.unwrap().indexable());
        let small = BlockFormat::new(&[64, 32], 4, 32, true, 64, 2, false);
        assert!(small.unwrap().indexable());
    }
}
