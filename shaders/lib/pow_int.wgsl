// Pow with an integer result (ONNX Pow of an int32/int64 base, whatever the exponent's type). The
// f32 power is only close to the integer it should be (pow(12, 6) may be off by one), so a
// non-negative integer exponent multiplies by squaring, exactly while the results stay below
// 2^24 (the device's exact integers); any other exponent gives a fraction, which truncates
// toward zero as integer Pow does.
fn pow_int_f32(x: f32, e: f32) -> f32 {
    if e < 0.0 || fract(e) != 0.0 {
        return trunc(pow_f32(x, e));
    }
    var n = u32(min(e, 4.0e9));
    var b = x;
    var r = 1.0;
    loop {
        if n == 0u {
            break;
        }
        if (n & 1u) == 1u {
            r = r * b;
        }
        b = b * b;
        n = n >> 1u;
    }
    return r;
}
