// {{KERNEL}}: {{SUMMARY}}
//
// DoRA's squared column norms n²[j] = || ALPHA W[:, j] + S (B A)[j, :] ||², for ROWS output
// features j per workgroup ({{OUT}} in all). The product B A is formed a tile at a time, as in
// the row-broadcast matmul (matmul_columns.wgsl): the ROWS rows of B are the same for the whole
// workgroup (one load each per k, not one per invocation), and invocation t owns the input
// features 4 t + 4 WG c + 0..3, c < VECS, of each tile of 4 WG VECS, for which it loads A's
// values and W's. So each k costs ROWS + 4 VECS loads for 4 ROWS VECS multiply-adds, where one
// feature per invocation would cost a load per multiply-add. Each invocation adds the squares of
// its elements into one partial sum per row; after one barrier (a tree per row would take 7
// each: a barrier is dear on a CPU driver) invocation jr adds the 64 partial sums of row jr and
// runs the epilogue (the rest of the magnitude scale) on the row's sum `acc`. Features past the
// edges are clamped for loading and contribute nothing.
//
// One dispatch may compute LAYERS layers of the same shapes (their norms read only their own
// parameters): workgroup g computes layer g / GROUPS, reading its weights through binding
// arrays (one copy of the loop, compiled once), and runs that layer's epilogue.

{{BINDINGS}}

const IN: u32 = {{IN}}u;
const OUT: u32 = {{OUT}}u;
const R: u32 = {{R}}u;
const ALPHA: f32 = {{ALPHA}};
const S: f32 = {{S}};
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
// Output features per workgroup, vec4s of input features per invocation, features per tile.
const ROWS: u32 = {{ROWS}}u;
const VECS: u32 = {{VECS}}u;
const WG: u32 = 64u;
const TILE: u32 = 4u * VECS * WG;
// Workgroups per layer, and layers.
const GROUPS: u32 = {{GROUPS}}u;
const LAYERS: u32 = {{LAYERS}}u;

// Every invocation's partial sums, for the invocation of each row to add up.
var<workgroup> partials: array<array<f32, ROWS>, WG>;

{{HELPERS}}

{{FINISH_FNS}}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let g = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    let layer = g / GROUPS;
    let j0 = (g % GROUPS) * ROWS; // first output feature
    if layer >= LAYERS {
        return;
    }
    // The loop is written in the entry point, not in a function, so that `layer` stays
    // uniform to the compiler (it indexes the binding arrays) and the loop exists once.
{{LAYER_BUFFERS}}    // The output features this workgroup loads, clamped to the last one.
    var js: array<u32, ROWS>;
    for (var jr = 0u; jr < ROWS; jr = jr + 1u) {
        js[jr] = min(j0 + jr, OUT - 1u);
    }
    // part[jr]: this invocation's share of || ALPHA W[:, j0 + jr] + S (B A)[j0 + jr, :] ||².
    var part: array<f32, ROWS>;
    for (var t0 = 0u; t0 < IN; t0 = t0 + TILE) {
        let i0 = t0 + 4u * lid;
        // The input features of this tile that this invocation owns (clamped), and which of
        // them are real.
        var feats: array<vec4<u32>, VECS>;
        var real: array<vec4<f32>, VECS>;
        for (var ci = 0u; ci < VECS; ci = ci + 1u) {
            let f = vec4<u32>(i0) + 4u * WG * ci + vec4<u32>(0u, 1u, 2u, 3u);
            feats[ci] = min(f, vec4<u32>(IN - 1u));
            real[ci] = select(vec4<f32>(0.0), vec4<f32>(1.0), f < vec4<u32>(IN));
        }
        // ba[jr][ci][e] = (B A)[j0 + jr, feats[ci][e]].
        var ba: array<array<vec4<f32>, VECS>, ROWS>;
        for (var k = 0u; k < R; k = k + 1u) {
            var av: array<vec4<f32>, VECS>;
            for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                let f = k * IN + feats[ci];
                av[ci] = vec4<f32>({{A}}[f.x], {{A}}[f.y], {{A}}[f.z], {{A}}[f.w]);
            }
            for (var jr = 0u; jr < ROWS; jr = jr + 1u) {
                let bv = vec4<f32>({{B}}[js[jr] * R + k]);
                for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                    ba[jr][ci] = fma(bv, av[ci], ba[jr][ci]);
                }
            }
        }
        for (var jr = 0u; jr < ROWS; jr = jr + 1u) {
            for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                let f = feats[ci];
                let j = js[jr];
                // W[f, j] (row f of the `in` axis, column j){{W_NOTE}}.
                let wv = vec4<f32>(
{{WV}}
                );
                let d = (ALPHA * wv + S * ba[jr][ci]) * real[ci];
                part[jr] = part[jr] + dot(d, d);
            }
        }
    }
    partials[lid] = part;
    workgroupBarrier();
    // Invocation jr adds up row jr's partial sums, so the rows' sums run side by side in SIMD
    // lanes (one invocation adding all of them would take ROWS times as long), and runs the
    // epilogue on it.
    let jr = lid;
    let i = j0 + jr;
    if jr < ROWS && i < OUT {
        var acc = 0.0;
        for (var t = 0u; t < WG; t = t + 1u) {
            acc = acc + partials[t][jr];
        }
        switch layer {
{{FINISH}}
            default: {}
        }
    }
}
