// tanh in f32 that is exact enough near 0 and safe for large |x|. The builtin tanh may be lowered
// to (e^2x - 1) / (e^2x + 1), which is inf/inf = NaN for large |x| and loses digits near 0.
// - |x| < 0.4: the Taylor series to x^13 (truncation below 2e-9 there);
// - otherwise 1 - 2 / (e^(2|x|) + 1), which tends to 1 when the exponential overflows.
// Measured against f64 tanh on [-8, 8]: absolute error below 1.1e-7.
fn tanh_f32(x: f32) -> f32 {
    let a = abs(x);
    if a < 0.4 {
        let x2 = x * x;
        let p = 1.0 + x2 * (-0.3333333333 + x2 * (0.1333333333 + x2 * (-0.0539682540
            + x2 * (0.0218694885 + x2 * (-0.0088632355 + x2 * 0.0035921280)))));
        return x * p;
    }
    let r = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    return select(r, -r, x < 0.0);
}
