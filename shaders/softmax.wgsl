// {{KERNEL}}: {{SUMMARY}}
//
// One workgroup per softmax row: {{ROWS}} rows of LEN = {{LEN}} elements, consecutive elements
// INNER = {{INNER}} apart (the dims after the axis). Numerically stable: the row maximum is
// subtracted before exponentiating, so exp never overflows.

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const LEN: u32 = {{LEN}}u;
const INNER: u32 = {{INNER}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
// The lowest finite f32: the start of a running maximum (WGSL constants cannot be -inf).
const LOWEST: f32 = -3.40282347e+38;

{{HELPERS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if row >= ROWS {
        return;
    }
    // Row `row` is (outer index o, inner index i); its element j is at base + j * INNER.
    let base = row / INNER * LEN * INNER + row % INNER;

    var m = LOWEST;
    for (var j = lid; j < LEN; j = j + WG) {
        m = max(m, x[base + j * INNER]);
    }
    let row_max = workgroup_max(lid, m);

    var s = 0.0;
    for (var j = lid; j < LEN; j = j + WG) {
        s = s + exp(x[base + j * INNER] - row_max);
    }
    let row_sum = workgroup_sum(lid, s);

    for (var j = lid; j < LEN; j = j + WG) {
        y[base + j * INNER] = exp(x[base + j * INNER] - row_max) / row_sum;
    }
}
