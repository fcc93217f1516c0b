// gelu'(x) * dy for the erf form: Phi(x) + x phi(x), with Phi written through erfc (as in the
// forward kernel) so that it keeps its accuracy in the left tail. Needs lib/erf.wgsl.
fn gelu_grad(x: f32, dy: f32) -> f32 {
    let cdf = 0.5 * erfc_f32(-x * 0.7071067812);
    let pdf = 0.3989422804 * exp(-0.5 * x * x);
    return (cdf + x * pdf) * dy;
}
