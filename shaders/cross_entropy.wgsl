// {{KERNEL}}: {{SUMMARY}}
//
// Mean softmax cross-entropy of ROWS = {{ROWS}} positions of C = {{C}} classes (logits rows are
// contiguous), in ONE workgroup: the result is a scalar, and WGSL has no float atomics to combine
// workgroups with. The 64 invocations take the positions one after the other, sharing each row's
// classes: row_softmax_stats gives the row's max M and S = sum_j exp(z_j - M) (numerically
// stable: exp never overflows), and the position's loss is (M - z_t) + log(S). Positions that do
// not count (see `class_of`) are skipped. Every invocation knows every loss; invocation
// row % 64 adds it to its own partial sum, and a final tree reduction adds the 64 partials, so
// the rounding error grows with ROWS / 64, not ROWS. The mean divides by the number of positions
// that count (NaN when none does, as in the reference).

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const C: u32 = {{C}}u;
// The lowest finite f32: the start of a running maximum (WGSL constants cannot be -inf).
const LOWEST: f32 = -3.40282347e+38;

{{HELPERS}}

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32) {
    var partial = 0.0;
    var count = 0.0;
    for (var row = 0u; row < ROWS; row = row + 1u) {
        let t = class_of(row);
        if t < 0 {
            continue;
        }
        let base = row * C;
        let stats = row_softmax_stats(lid, base);
        if lid == row % WG {
            partial = partial + ((stats.x - logits[base + u32(t)]) + log(stats.y));
        }
        count = count + 1.0;
    }
    let total = workgroup_sum(lid, partial);
    if lid == 0u {
        y[0] = total / count;
    }
}
