// {{KERNEL}}: {{SUMMARY}}
//
// One workgroup per normalised row ({{ROWS}} rows of D = {{D}} contiguous elements). Two
// reductions give the mean and then the (biased) variance of the deviations from it (two passes,
// not E[x^2] - E[x]^2, which cancels badly). Then
// y = (x - mean) / sqrt(var + eps) * scale{{BIAS_NOTE}}.

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const D: u32 = {{D}}u;
const EPS: f32 = {{EPS}};
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;

{{HELPERS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if row >= ROWS {
        return;
    }
    let base = row * D;

    // Everything is computed relative to the row's first element: x - shift is exact for
    // elements near it, so a mean that is large compared to the row's spread costs no digits
    // (rounding the mean itself to f32 would cost up to half an ulp of the mean).
    let shift = x[base];
    var s = 0.0;
    for (var t = lid; t < D; t = t + WG) {
        s = s + (x[base + t] - shift);
    }
    let rel_mean = workgroup_sum(lid, s) / f32(D); // the mean minus shift

    var q = 0.0;
    for (var t = lid; t < D; t = t + WG) {
        let d = (x[base + t] - shift) - rel_mean;
        q = q + d * d;
    }
    let inv_std = 1.0 / sqrt(workgroup_sum(lid, q) / f32(D) + EPS);

    for (var t = lid; t < D; t = t + WG) {
        y[base + t] = {{OUTPUT}};
    }
}
