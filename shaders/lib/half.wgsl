// Decoding 16-bit floats stored two per u32 (weights kept in half precision on the device).
// By hand rather than with unpack2x16float, which some adapters lack; no branches, so a SIMD
// lane group never diverges on the kind of value.

// The IEEE binary16 value in the low 16 bits of `h`, exactly, as f32.
fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    let normal = bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
    // Subnormals (and zero): m * 2^-24.
    let small = bitcast<f32>(bitcast<u32>(f32(m) * 5.9604645e-8) | sign);
    let special = bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    return select(select(normal, special, e == 31u), small, e == 0u);
}

// Element `k` of an array of binary16 pairs, from its word.
fn f16_at(word: u32, k: u32) -> f32 {
    return f16_to_f32((word >> (16u * (k & 1u))) & 0xffffu);
}

// Element `k` of an array of bfloat16 pairs, from its word: the top half of an f32.
fn bf16_at(word: u32, k: u32) -> f32 {
    return bitcast<f32>(((word >> (16u * (k & 1u))) & 0xffffu) << 16u);
}
