// {{KERNEL}}: {{SUMMARY}}
//
// DoRA's squared column norms n²[j] = || ALPHA W[:, j] + S (B A)[j, :] ||², one workgroup per
// column j ({{OUT}} in all). Invocation t walks rows i = t, t + 64, ... of the column: it forms
// v = (B A)[j, i] = sum_k B[j, k] A[k, i] (R terms; B's row is the same for the whole workgroup)
// and adds (ALPHA W[i, j] + S v)². The workgroup adds the 64 partial sums in a tree, and
// invocation 0 runs the epilogue (the rest of the magnitude scale) on the sum `acc`.

{{BINDINGS}}

const IN: u32 = {{IN}}u;
const OUT: u32 = {{OUT}}u;
const R: u32 = {{R}}u;
const ALPHA: f32 = {{ALPHA}};
const S: f32 = {{S}};
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;

{{HELPERS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let j = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if j >= OUT {
        return;
    }
    var part = 0.0;
    for (var row = lid; row < IN; row = row + WG) {
        var v = 0.0;
        for (var k = 0u; k < R; k = k + 1u) {
            v = v + lora_b[j * R + k] * lora_a[k * IN + row];
        }
        let d = ALPHA * w[w_at(row, j)] + S * v;
        part = part + d * d;
    }
    let acc = workgroup_sum(lid, part);
    if lid == 0u {
        let i = j;
{{EPILOGUE}}
    }
}
