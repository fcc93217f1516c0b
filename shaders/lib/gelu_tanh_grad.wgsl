// gelu'(x) * dy for the tanh approximation 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3),
// c = sqrt(2 / pi):
//   0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2),  t = tanh(u).
// Both 1 + t and 1 - t^2 come from e = exp(-2|u|) without cancelling: 1 - t^2 = 4e / (1 + e)^2,
// and 1 + t = 2 / (1 + e) for u >= 0, 2e / (1 + e) below.
fn gelu_tanh_grad(x: f32, dy: f32) -> f32 {
    let u = 0.7978845608 * (x + 0.044715 * x * x * x);
    let e = exp(-2.0 * abs(u));
    let one_minus_t2 = 4.0 * e / ((1.0 + e) * (1.0 + e));
    let one_plus_t = select(2.0 * e, 2.0, u >= 0.0) / (1.0 + e);
    let d = 0.5 * one_plus_t + 0.5 * x * one_minus_t2 * 0.7978845608 * (1.0 + 0.134145 * x * x);
    return d * dy;
}
