// {{KERNEL}}: {{SUMMARY}}
//
// One invocation per output element ({{ROWS}} in all, 64 per workgroup), each summing its R =
// {{R}} terms {{TERM}} in four interleaved partial sums: the CPU target's reduction, with no
// workgroup memory and no barriers (on a CPU driver a barrier switches every invocation's
// context, and the tree of reduce_sum.wgsl takes seven per output). Used for sums of at most a
// few thousand terms, where a serial f32 sum stays accurate. The epilogue turns each sum `acc`
// into the stored value (element-wise work that reads it, fused into this kernel).

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const R: u32 = {{R}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;

{{HELPERS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = ((wg.z * GRID_Y + wg.y) * GRID_X + wg.x) * 64u + lid;
    if row >= ROWS {
        return;
    }
    let base = row_base(row);
    var parts = vec4<f32>(0.0);
    for (var t = 0u; t < R; t = t + 1u) {
        let v = x_get(base + reduced_offset(t));{{BESIDE}}
        parts[t & 3u] = parts[t & 3u] + {{TERM}};
    }
    let i = row;
    let acc = (parts.x + parts.y) + (parts.z + parts.w);
{{EPILOGUE}}
}
