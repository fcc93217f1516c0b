// {{KERNEL}}: {{SUMMARY}}
//
// DoRA's squared column norms n²[j] = || ALPHA W[:, j] + S (B A)[j, :] ||², computed in the
// factored form of dora-math.md, as a matrix product with an epilogue, for a CPU driver whose
// subgroups are SG invocations run as the lanes of one SIMD register (lavapipe):
//
//   n²[j] = ALPHA² ||W[:, j]||² + 2 ALPHA S B[j, :] (A W[:, j]) + S² B[j, :] (A Aᵀ) B[j, :]ᵀ
//
// The product P = A Wᵀ (R x OUT, R <= 16) is the one term of size R x IN x OUT. It runs as the
// row-broadcast matmul does (matmul_columns.wgsl): a workgroup is one subgroup, each lane owns
// 4 * VECS output features (neighbouring lanes, neighbouring features) and all R rows of P for
// them, in registers; per input feature it loads its features' W values (summing their squares
// as it goes) and takes A's R values from the lanes that loaded them, by shuffles. The Gram
// matrix A Aᵀ (R x R) is then summed by every workgroup for itself (R² IN multiply-adds, R /
// TILE of the workgroup's share of P), each lane over every SG-th input feature, and added
// across the subgroup. On lavapipe, 4 layers of 512 x 512 at rank 16 take 1.43 ms this way
// against 2.35 ms for dora_norm_subgroup.wgsl, which forms (B A)[j, :] for every j (the same
// multiply-adds, but with A's values broadcast one lane at a time and W read one feature per
// lane).
//
// In this form every term is summed from values of its own scale: ||W[:, j]||² dominates n²
// wherever the update is small next to W, and f32 rounding stays near 1e-7 of n² (the tests
// check every path against the f64 reference). Input features past the edge are clamped for
// loading and contribute nothing; features past the last output are clamped for loading and
// not stored.
//
// One dispatch may compute LAYERS layers of the same shapes (their norms read only their own
// parameters): workgroup g computes layer g / GROUPS, reading its weights through binding
// arrays (one copy of the loop, compiled once), and runs that layer's epilogue.

{{BINDINGS}}

const IN: u32 = {{IN}}u;
const OUT: u32 = {{OUT}}u;
const R: u32 = {{R}}u;
// R / 4: the Gram matrix's rows are kept as vec4s.
const RV: u32 = {{RV}}u;
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

    // prod[k][c]: (A Wᵀ)[k, cols[c]]; wsq[c]: ||W[:, cols[c]]||².
    var prod: array<array<vec4<f32>, VECS>, R>;
    var wsq: array<vec4<f32>, VECS>;
    for (var i0 = 0u; i0 < IN; i0 = i0 + SG) {
        // This lane's values of A for the block, A[k, i0 + lane] (clamped), shuffled round.
        var amine: array<f32, R>;
        let mine = min(i0 + lane, IN - 1u);
        for (var k = 0u; k < R; k = k + 1u) {
            amine[k] = {{A}}[k * IN + mine];
        }
        for (var pe = 0u; pe < min(SG, IN - i0); pe = pe + 1u) {
            let i = i0 + pe;
            // W[i, cols[c]] (row i of the `in` axis){{W_NOTE}}.
            var wv: array<vec4<f32>, VECS>;
            for (var c = 0u; c < VECS; c = c + 1u) {
                let j = cols[c];
                wv[c] = vec4<f32>(
{{WV}}
                );
                wsq[c] = fma(wv[c], wv[c], wsq[c]);
            }
            for (var k = 0u; k < R; k = k + 1u) {
                let av = vec4<f32>(subgroupShuffle(amine[k], pe));
                for (var c = 0u; c < VECS; c = c + 1u) {
                    prod[k][c] = fma(av, wv[c], prod[k][c]);
                }
            }
        }
    }
    // lin[c]: B[cols[c], :] (A Wᵀ)[:, cols[c]], taken before the Gram matrix so that prod's
    // registers are free for it.
    var lin: array<vec4<f32>, VECS>;
    for (var c = 0u; c < VECS; c = c + 1u) {
        let j = cols[c];
        for (var k = 0u; k < R; k = k + 1u) {
            let bk = vec4<f32>({{B}}[j.x * R + k], {{B}}[j.y * R + k], {{B}}[j.z * R + k], {{B}}[j.w * R + k]);
            lin[c] = fma(bk, prod[k][c], lin[c]);
        }
    }
    // gram[k][q]: (A Aᵀ)[k, 4 q .. 4 q + 3], summed by each lane over the features i0 + lane,
    // then across the subgroup. (Components are written out: a vector indexed by a loop
    // counter would keep the array out of registers.)
    var gram: array<array<vec4<f32>, RV>, R>;
    for (var i0 = 0u; i0 < IN; i0 = i0 + SG) {
        let real = select(0.0, 1.0, i0 + lane < IN);
        let mine = min(i0 + lane, IN - 1u);
        var av: array<vec4<f32>, RV>;
        for (var q = 0u; q < RV; q = q + 1u) {
            let k = 4u * q;
            av[q] = real * vec4<f32>(
                {{A}}[k * IN + mine],
                {{A}}[(k + 1u) * IN + mine],
                {{A}}[(k + 2u) * IN + mine],
                {{A}}[(k + 3u) * IN + mine]
            );
        }
        for (var q = 0u; q < RV; q = q + 1u) {
            let aq = av[q];
            for (var p = 0u; p < RV; p = p + 1u) {
                gram[4u * q][p] = fma(vec4<f32>(aq.x), av[p], gram[4u * q][p]);
                gram[4u * q + 1u][p] = fma(vec4<f32>(aq.y), av[p], gram[4u * q + 1u][p]);
                gram[4u * q + 2u][p] = fma(vec4<f32>(aq.z), av[p], gram[4u * q + 2u][p]);
                gram[4u * q + 3u][p] = fma(vec4<f32>(aq.w), av[p], gram[4u * q + 3u][p]);
            }
        }
    }
    for (var k = 0u; k < R; k = k + 1u) {
        for (var q = 0u; q < RV; q = q + 1u) {
            gram[k][q] = subgroupAdd(gram[k][q]);
        }
    }
    for (var c = 0u; c < VECS; c = c + 1u) {
        let j = cols[c];
        var bj: array<vec4<f32>, R>;
        for (var k = 0u; k < R; k = k + 1u) {
            bj[k] = vec4<f32>({{B}}[j.x * R + k], {{B}}[j.y * R + k], {{B}}[j.z * R + k], {{B}}[j.w * R + k]);
        }
        // quad: B[j, :] (A Aᵀ) B[j, :]ᵀ for the four features of bj.
        var quad = vec4<f32>(0.0);
        for (var k = 0u; k < R; k = k + 1u) {
            var t = vec4<f32>(0.0);
            for (var q = 0u; q < RV; q = q + 1u) {
                let gk = gram[k][q];
                t = fma(vec4<f32>(gk.x), bj[4u * q], t);
                t = fma(vec4<f32>(gk.y), bj[4u * q + 1u], t);
                t = fma(vec4<f32>(gk.z), bj[4u * q + 2u], t);
                t = fma(vec4<f32>(gk.w), bj[4u * q + 3u], t);
            }
            quad = fma(bj[k], t, quad);
        }
        let sums = ALPHA * ALPHA * wsq[c] + 2.0 * ALPHA * S * lin[c] + S * S * quad;
        for (var e = 0u; e < 4u; e = e + 1u) {
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
