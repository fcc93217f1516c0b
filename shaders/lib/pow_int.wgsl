// Pow with an integer result (ONNX Pow of an int32/int64 base, whatever the exponent's type): the
// f32 power is only close to the integer it should be (pow(3, 6) may be 729.0002), so a
// non-negative integer exponent rounds it to the nearest integer; any other exponent gives a
// fraction (or an inexact float), which truncates toward zero as integer Pow does.
fn pow_int_f32(x: f32, e: f32) -> f32 {
    let r = pow_f32(x, e);
    return select(trunc(r), round(r), e >= 0.0 && fract(e) == 0.0);
}
