// {{KERNEL}}: {{SUMMARY}}
//
// One workgroup per output element ({{ROWS}} in all), each multiplying R = {{R}} terms {{TERM}}:
// every invocation multiplies a strided share, then the workgroup multiplies the 64 partial
// products in a tree. No terms at all give 1.

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const R: u32 = {{R}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;

{{HELPERS}}

fn workgroup_prod(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if lid < s {
            scratch[lid] = scratch[lid] * scratch[lid + s];
        }
        workgroupBarrier();
    }
    let total = scratch[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if row >= ROWS {
        return;
    }
    let base = row_base(row);
    var p = 1.0;
    for (var t = lid; t < R; t = t + WG) {
        let v = x_get(base + reduced_offset(t));
        p = p * {{TERM}};
    }
    let total = workgroup_prod(lid, p);
    if lid == 0u {
        y[row] = total;
    }
}
