// {{KERNEL}}: {{SUMMARY}}
//
// DoRA's squared column norms n²[j] = || ALPHA W[:, j] + S (B A)[j, :] ||², one output feature j
// per invocation ({{OUT}} in all), for a CPU driver whose subgroups are SG invocations run as
// the lanes of one SIMD register (lavapipe). Each invocation keeps its row of B in registers
// and walks the input features SG at a time. The values of A it needs, A[k, i0..i0 + SG], are
// the same for every invocation: loaded one per lane (a single gather) and handed to all
// lanes by subgroup broadcasts, which cost a register shuffle each, where a load of the same
// address by every lane costs far more on such a driver (on lavapipe, one 512 x 512 layer of
// rank 16 takes 0.48 ms this way, 1.46 ms in the shared-tile kernel of dora_norm.wgsl, and
// 2.2 ms when every lane loads each value of A itself). No workgroup memory, no barrier: each
// invocation sums its own squares and runs the epilogue (the rest of the magnitude scale) on
// its sum `acc`. Input features past the edge are clamped for loading and contribute nothing;
// invocations past the last output feature compute a copy of it (every lane must take part in
// the broadcasts) and store nothing.
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
// Invocations per subgroup (the adapter's one subgroup size) and per workgroup.
const SG: u32 = {{SG}}u;
const WG: u32 = 64u;
// Workgroups per layer, and layers.
const GROUPS: u32 = {{GROUPS}}u;
const LAYERS: u32 = {{LAYERS}}u;

{{HELPERS}}

{{FINISH_FNS}}

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let g = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    let layer = g / GROUPS;
    if layer >= LAYERS {
        return;
    }
    // The loop is written in the entry point, not in a function, so that `layer` stays
    // uniform to the compiler (it indexes the binding arrays) and the loop exists once.
{{LAYER_BUFFERS}}    let i = (g % GROUPS) * WG + lid; // this invocation's output feature
    let j = min(i, OUT - 1u);
    var bj: array<f32, R>;
    for (var k = 0u; k < R; k = k + 1u) {
        bj[k] = {{B}}[j * R + k];
    }
    // part: this invocation's || ALPHA W[:, j] + S (B A)[j, :] ||², four partial sums.
    var part = vec4<f32>(0.0);
    for (var i0 = 0u; i0 < IN; i0 = i0 + SG) {
        // ba[c][e] = (B A)[j, i0 + 4 c + e].
        var ba: array<vec4<f32>, SG / 4u>;
        let mine = min(i0 + lane, IN - 1u); // the feature whose A values this lane loads
        for (var k = 0u; k < R; k = k + 1u) {
            let a = {{A}}[k * IN + mine];
            let bk = vec4<f32>(bj[k]);
{{BROADCASTS}}
        }
        for (var c = 0u; c < SG / 4u; c = c + 1u) {
            let f = vec4<u32>(i0 + 4u * c) + vec4<u32>(0u, 1u, 2u, 3u);
            let fc = min(f, vec4<u32>(IN - 1u));
            let real = select(vec4<f32>(0.0), vec4<f32>(1.0), f < vec4<u32>(IN));
            // W[fc, j] (row fc of the `in` axis, column j){{W_NOTE}}.
            let wv = vec4<f32>(
{{WV}}
            );
            let d = (ALPHA * wv + S * ba[c]) * real;
            part = fma(d, d, part);
        }
    }
    let acc = part.x + part.y + part.z + part.w;
    if i < OUT {
        switch layer {
{{FINISH}}
            default: {}
        }
    }
}
