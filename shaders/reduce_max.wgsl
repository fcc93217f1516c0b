// {{KERNEL}}: {{SUMMARY}}
//
// One workgroup per output element ({{ROWS}} in all), each taking the maximum of R = {{R}} terms
// {{TERM}} (a minimum is the negated maximum of negated terms: SIGN = {{SIGN}}): every invocation
// folds a strided share, then the workgroup combines the 64 partial results in a tree. A NaN term
// makes the result NaN; no terms at all give -inf (times SIGN), as ONNX's empty reductions.

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const R: u32 = {{R}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
const SIGN: f32 = {{SIGN}};

{{HELPERS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    // Every invocation must reach the workgroup reductions (barriers): no early return.
    let live = row < ROWS;
    var bits = 0xff800000u; // -inf, from a variable (a WGSL constant may not be infinite)
    var m = bitcast<f32>(bits);
    var nan = 0.0;
    if live {
        let base = row_base(row);
        for (var t = lid; t < R; t = t + WG) {
            let v = x_get(base + reduced_offset(t));
            let term = SIGN * ({{TERM}});
            if is_nan_f32(term) {
                nan = 1.0;
            } else {
                m = max(m, term);
            }
        }
    }
    let best = workgroup_max(lid, m);
    let any_nan = workgroup_max(lid, nan);
    if live && lid == 0u {
        bits = 0x7fc00000u; // NaN
        y[row] = select(SIGN * best, bitcast<f32>(bits), any_nan > 0.0);
    }
}
