// {{KERNEL}}: {{SUMMARY}}
//
// One workgroup per output element ({{ROWS}} in all), each summing R = {{R}} terms {{TERM}}:
// every invocation adds a strided share, then the workgroup adds the 64 partial sums in a tree,
// and invocation 0 runs the epilogue on the sum `acc` (element-wise work fused into this kernel).

{{BINDINGS}}

const ROWS: u32 = {{ROWS}}u;
const R: u32 = {{R}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;

{{HELPERS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if row >= ROWS {
        return;
    }
    let base = row_base(row);
    var s = 0.0;
    for (var t = lid; t < R; t = t + WG) {
        let v = x_get(base + reduced_offset(t));{{BESIDE}}
        s = s + {{TERM}};
    }
    let total = workgroup_sum(lid, s);
    if lid == 0u {
        let i = row;
        let acc = total;
{{EPILOGUE}}
    }
}
