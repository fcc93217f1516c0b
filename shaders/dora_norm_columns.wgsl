// {{KERNEL}}: {{SUMMARY}}
//
// DoRA's squared column norms n²[j] = || ALPHA W[:, j] + S (B A)[j, :] ||², for a CPU driver
// whose subgroups are SG invocations run as the lanes of one SIMD register (lavapipe), summed
// element by element: the R x IN x OUT multiply-adds of B A are the one term of that size, as
// A Wᵀ is in the factored form of dora-math.md, and this form needs nothing else of size R² IN
// (the factored form's Gram matrix A Aᵀ, which every workgroup would sum for itself: 12% more
// multiply-adds at R = 16 and 128 features a workgroup, and 0.4 of 3.0 ms for four 512 x 512
// layers on lavapipe). It runs as the row-broadcast matmul does (matmul_columns.wgsl): a
// workgroup is one subgroup, each lane owns 4 * VECS output features (neighbouring lanes,
// neighbouring features) and holds their rows of B in registers; per input feature i it takes
// A's R values from the lanes that loaded them, by shuffles, forms (B A)[j, i] for its features,
// loads their W values and adds the squares of the adapted elements. VECS is kept small
// (NORM_COLUMNS_VEC4S in kernels.rs: one vec4 of features per lane from rank 8) so that the rows
// of B stay in registers. Four 512 x 512 layers of rank 16 on lavapipe: 1.67-1.73 ms, against
// 2.62-2.64 with four vec4s per lane and 3.0 for the factored form (which had taken them from
// 2.35 ms with dora_norm_subgroup.wgsl, the same sum with A's values broadcast one lane at a
// time and W read one feature per lane, and which now serves ranks above 32).
//
// Every term is a square, so nothing cancels and f32 rounding stays near 1e-7 of n² (the tests
// check every path against the f64 reference). Input features past the edge are not summed;
// features past the last output are clamped for loading and not stored.
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
// Lanes per subgroup (= invocations per workgroup), vec4s of output features per lane, and
// output features per workgroup.
const SG: u32 = {{SG}}u;
const VECS: u32 = {{VECS}}u;
const TILE: u32 = 4u * VECS * SG;
// Workgroups per layer, and layers.
const GROUPS: u32 = {{GROUPS}}u;
const LAYERS: u32 = {{LAYERS}}u;

{{HELPERS}}

// The bound of the loops over input features, a block's steps and a vec4's features: `n`
// itself, or, for a small norm, `n` in a form the shader compiler cannot evaluate (no buffer
// holds 2^32 - 1 values, so the select gives `n`), which keeps it from unrolling those loops.
fn bound(n: u32) -> u32 {
    return {{BOUND}};
}

{{FINISH_FNS}}

@compute @workgroup_size({{SG}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let g = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    let layer = g / GROUPS;
    if layer >= LAYERS {
        return;
    }
    // The loops are written in the entry point, not in functions, so that `layer` stays
    // uniform to the compiler (it indexes the binding arrays) and each loop exists once.
{{LAYER_BUFFERS}}    let col0 = (g % GROUPS) * TILE + 4u * lane; // this lane's first output feature
    // Lane `lane`'s output features 4 * SG * c + 0..3 from col0, clamped into W.
    var cols: array<vec4<u32>, VECS>;
    for (var c = 0u; c < VECS; c = c + 1u) {
        let j = col0 + 4u * SG * c;
        cols[c] = min(vec4<u32>(j, j + 1u, j + 2u, j + 3u), vec4<u32>(OUT - 1u));
    }

    // bj[k][c]: B[cols[c], k], this lane's features' rows of B, loaded once.
    var bj: array<array<vec4<f32>, VECS>, R>;
    for (var c = 0u; c < VECS; c = c + 1u) {
        let j = cols[c];
        for (var k = 0u; k < R; k = k + 1u) {
            bj[k][c] = vec4<f32>({{B}}[j.x * R + k], {{B}}[j.y * R + k], {{B}}[j.z * R + k], {{B}}[j.w * R + k]);
        }
    }
    // nsq[c]: the squared norms of the lane's features' columns of ALPHA W + S (B A), summed
    // element by element.
    var nsq: array<vec4<f32>, VECS>;
    for (var i0 = 0u; i0 < bound(IN); i0 = i0 + SG) {
        // This lane's values of A for the block, A[k, i0 + lane] (clamped), shuffled round.
        var amine: array<f32, R>;
        let mine = min(i0 + lane, IN - 1u);
        for (var k = 0u; k < R; k = k + 1u) {
            amine[k] = {{A}}[k * IN + mine];
        }
        for (var pe = 0u; pe < bound({{STEPS}}); pe = pe + 1u) {
            let i = i0 + pe;
            // (B A)[cols[c], i], then the element of the adapted column.
            var ba: array<vec4<f32>, VECS>;
            for (var k = 0u; k < R; k = k + 1u) {
                let av = vec4<f32>(subgroupShuffle(amine[k], pe));
                for (var c = 0u; c < VECS; c = c + 1u) {
                    ba[c] = fma(av, bj[k][c], ba[c]);
                }
            }
            for (var c = 0u; c < VECS; c = c + 1u) {
                let j = cols[c];
                // W[i, cols[c]] (row i of the `in` axis){{W_NOTE}}.
                let wv = vec4<f32>(
{{WV}}
                );
                let v = fma(vec4<f32>(S), ba[c], ALPHA * wv);
                nsq[c] = fma(v, v, nsq[c]);
            }
        }
    }
    for (var c = 0u; c < VECS; c = c + 1u) {
        let sums = nsq[c];
        for (var e = 0u; e < bound(4u); e = e + 1u) {
            let i = col0 + 4u * SG * c + e; // the output feature
            let acc = sums[e];
            if i < OUT {
                switch layer {
{{FINISH}}
                    default: {}
                }
            }
        }
    }
}
