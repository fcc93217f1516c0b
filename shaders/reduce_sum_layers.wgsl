// {{KERNEL}}: {{SUMMARY}}
//
// LAYERS sums of the same shape in one dispatch (the layer batches of `fusion`): each adds, for
// every output element, the R = {{R}} sums over tiles of rows that a product's kernel wrote (the
// column sums of `fusion`: DoRA's magnitude gradients). One invocation per output element, 64 per
// workgroup and GROUPS workgroups per layer, summing in four interleaved partial sums as
// reduce_sum_lanes.wgsl does (the same rounding as one kernel per layer). Layer l reads its sums
// through the binding array `x` and runs its own epilogue, on its own bindings, on the sum `acc`.

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const R: u32 = {{R}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
// Workgroups per layer, and layers.
const GROUPS: u32 = {{GROUPS}}u;
const LAYERS: u32 = {{LAYERS}}u;

{{HELPERS}}

{{FINISH_FNS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    let layer = g / GROUPS;
    let row = g % GROUPS * 64u + lid;
    if layer >= LAYERS || row >= ROWS {
        return;
    }
    // The loop is written in the entry point, not in a function, so that `layer` stays uniform
    // to the compiler (it indexes the binding array).
    let x_l = &x[layer];
    let base = row_base(row);
    var parts = vec4<f32>(0.0);
    for (var t = 0u; t < R; t = t + 1u) {
        parts[t & 3u] = parts[t & 3u] + (*x_l).v[base + reduced_offset(t)];
    }
    let i = row;
    let acc = (parts.x + parts.y) + (parts.z + parts.w);
    switch layer {
{{FINISH}}
        default: {}
    }
}
