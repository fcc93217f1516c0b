// Decoding block-quantized weights stored on the device as their model stores them (src/ir/
// blocks.rs): 2-, 4- or 8-bit codes packed from the low bits of each word up, in lines of
// `line_codes` codes, a scale and a zero point per block of `block` codes of a line.

// Where element `i` of a constant `cols` wide is: x, its code's bit offset; y, its block. A
// line runs down a column (`down_columns`) or along a row.
fn block_place(i: u32, cols: u32, down_columns: bool, line_codes: u32, bits: u32, blocks: u32,
               block: u32) -> vec2<u32> {
    let row = i / cols;
    let col = i % cols;
    let line = select(row, col, down_columns);
    let at = select(col, row, down_columns);
    return vec2<u32>((line * line_codes + at) * bits, line * blocks + at / block);
}

// The value of the code at bit `bit` of `word`: (code - zero) * scale, as the importer computes.
fn block_value(word: u32, bit: u32, bits: u32, zero: f32, scale: f32) -> f32 {
    let code = (word >> (bit & 31u)) & ((1u << bits) - 1u);
    return (f32(code) - zero) * scale;
}
