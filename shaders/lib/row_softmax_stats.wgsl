// The maximum M of the C logits of one row starting at `base`, and S = sum_j exp(z_j - M), computed
// by the whole workgroup in one pass over the row: each invocation keeps an online (max, sum)
// pair over its strided share (rescaling its sum when its max grows), then one max and one sum
// reduction combine them. Every invocation must call it (it contains barriers) and gets (M, S).
// Needs lib/workgroup_reduce.wgsl, the `logits` binding and the constants C and LOWEST.
fn row_softmax_stats(lid: u32, base: u32) -> vec2<f32> {
    var m = LOWEST;
    var s = 0.0;
    for (var j = lid; j < C; j = j + WG) {
        let v = logits[base + j];
        if v > m {
            s = s * exp(m - v) + 1.0;
            m = v;
        } else {
            s = s + exp(v - m);
        }
    }
    let row_max = workgroup_max(lid, m);
    let row_sum = workgroup_sum(lid, s * exp(m - row_max));
    return vec2<f32>(row_max, row_sum);
}
