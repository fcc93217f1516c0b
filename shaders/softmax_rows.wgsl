// {{KERNEL}}: {{SUMMARY}}
//
// One invocation per softmax row, for short rows: {{ROWS}} rows of LEN = {{LEN}} elements,
// consecutive elements INNER = {{INNER}} apart (the dims after the axis). A row this short
// leaves most of a workgroup idle in softmax.wgsl, and its tree reductions cost a barrier a
// step, which on a CPU driver switches every invocation's context (lavapipe: MiniLM's
// attention softmax, 384 rows of 16, took 0.93 ms there). Numerically stable: the row maximum
// is subtracted before exponentiating, so exp never overflows.

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
    let row = ((wg.z * GRID_Y + wg.y) * GRID_X + wg.x) * 64u + lid;
    if row >= ROWS {
        return;
    }
    // Row `row` is (outer index o, inner index i); its element j is at base + j * INNER.
    let base = row / INNER * LEN * INNER + row % INNER;

    var m = LOWEST;
    for (var j = 0u; j < LEN; j = j + 1u) {
        m = max(m, x[base + j * INNER]);
    }
    var s = 0.0;
    for (var j = 0u; j < LEN; j = j + 1u) {
        s = s + exp(x[base + j * INNER] - m);
    }
    for (var j = 0u; j < LEN; j = j + 1u) {
        y[base + j * INNER] = exp(x[base + j * INNER] - m) / s;
    }
}
