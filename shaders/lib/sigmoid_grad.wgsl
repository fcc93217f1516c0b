// sigmoid'(x) * dy. sigmoid'(x) = s (1 - s) is written e / (1 + e)^2 with e = exp(-|x|), which
// keeps its relative accuracy in both tails (1 - s cancels for large x) and never overflows.
fn sigmoid_grad(x: f32, dy: f32) -> f32 {
    let e = exp(-abs(x));
    return e / ((1.0 + e) * (1.0 + e)) * dy;
}
