// {{KERNEL}}: {{SUMMARY}}
//
// Gradient of the mean softmax cross-entropy w.r.t. the logits: one workgroup per position
// (ROWS = {{ROWS}} rows of C = {{C}} contiguous classes), dlogits[j] = dloss / count * (p_j - [j ==
// t]) with p the row's softmax (max-subtracted, see row_softmax_stats), and zeros for positions
// that do not count (see `class_of`). Each workgroup first counts the positions that do (a strided
// pass over the labels and a tree reduction), so the mean's divisor needs no second kernel.

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const C: u32 = {{C}}u;
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
    var n = 0.0;
    for (var r = lid; r < ROWS; r = r + WG) {
        if class_of(r) >= 0 {
            n = n + 1.0;
        }
    }
    let count = workgroup_sum(lid, n);

    let base = row * C;
    let t = class_of(row);
    if t < 0 {
        for (var j = lid; j < C; j = j + WG) {
            y[base + j] = 0.0;
        }
        return;
    }
    let stats = row_softmax_stats(lid, base);
    let scale = dloss[0] / count;
    for (var j = lid; j < C; j = j + WG) {
        let p = exp(logits[base + j] - stats.x) / stats.y;
        y[base + j] = scale * (p - select(0.0, 1.0, j == u32(t)));
    }
}
