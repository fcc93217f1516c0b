// Decoding block-quantized weights stored on the device as codes (src/ir/blocks.rs): 2-, 4- or
// 8-bit codes in the constant's row-major order, packed from the low bits of each word up, then
// a scale and a zero point per block of `block` codes down a column or along a row.

// The block of element `i` of a constant `cols` wide whose blocks run down its columns: the
// blocks are stored row-major over (block row, column), so a row's columns read consecutive
// words.
fn block_down(i: u32, cols: u32, block: u32) -> u32 {
    return i / (cols * block) * cols + i % cols;
}

// The block of element `i` of a constant `cols` wide whose blocks run along its rows, `blocks`
// a row.
fn block_along(i: u32, cols: u32, blocks: u32, block: u32) -> u32 {
    return i / cols * blocks + i % cols / block;
}

// The value of the code at bit `bit` of the codes (`word` holds it): (code - zero) * scale, as
// the importer computes it.
fn block_value(word: u32, bit: u32, bits: u32, zero: f32, scale: f32) -> f32 {
    let code = (word >> (bit & 31u)) & ((1u << bits) - 1u);
    return (f32(code) - zero) * scale;
}
