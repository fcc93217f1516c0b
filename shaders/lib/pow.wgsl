// x^e with the semantics of f64 powf (and ONNX Pow) where WGSL's pow is undefined:
// - a negative base with an integer exponent gives |x|^e with the sign of (-1)^e;
// - a negative base with a fractional exponent gives NaN;
// - x^0 = 1 for every x, 0^e = 0 for e > 0 and +inf for e < 0.
// NaN and inf come from bit patterns held in a variable: a WGSL constant expression may not be
// NaN or inf.
fn pow_f32(x: f32, e: f32) -> f32 {
    var special = 0x7fc00000u; // NaN
    if e == 0.0 {
        return 1.0;
    }
    if x == 0.0 {
        if e > 0.0 {
            return 0.0;
        }
        special = 0x7f800000u; // +inf
        return bitcast<f32>(special);
    }
    let m = pow(abs(x), e);
    if x > 0.0 {
        return m;
    }
    if fract(e) != 0.0 {
        return bitcast<f32>(special);
    }
    // An odd integer exponent keeps the sign; fract(e / 2) is 0 for even e (and for every e
    // above 2^24, where all floats are even integers).
    return select(m, -m, fract(e * 0.5) != 0.0);
}
