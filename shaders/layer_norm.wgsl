// {{KERNEL}}: {{SUMMARY}}
//
// One workgroup per normalised row ({{ROWS}} rows of D = {{D}} contiguous elements). Two
// reductions give the mean and the (biased) variance; the variance pass subtracts the mean first,
// which keeps it accurate when the mean is large. Then
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

    // Summing x - x[base] instead of x keeps the partial sums small when the row's mean is
    // large compared to its spread, so the mean does not lose digits.
    let shift = x[base];
    var s = 0.0;
    for (var t = lid; t < D; t = t + WG) {
        s = s + (x[base + t] - shift);
    }
    let mean = shift + workgroup_sum(lid, s) / f32(D);

    var q = 0.0;
    for (var t = lid; t < D; t = t + WG) {
        let d = x[base + t] - mean;
        q = q + d * d;
    }
    let inv_std = 1.0 / sqrt(workgroup_sum(lid, q) / f32(D) + EPS);

    for (var t = lid; t < D; t = t + WG) {
        y[base + t] = {{OUTPUT}};
    }
}
