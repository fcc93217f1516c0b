// True when x is NaN, decided on the bits: a compiler may assume that `x != x` is false.
fn is_nan_f32(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}
