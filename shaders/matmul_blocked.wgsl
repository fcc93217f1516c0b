// {{KERNEL}}: {{SUMMARY}}
//
// Register-blocked matrix product: {{BATCH}} x ({{M}}x{{K}} @ {{K}}x{{N}}).
// Each workgroup of WG_X x WG_Y invocations computes one TILE_M x TILE_N tile of one output matrix
// (TILE_M = 4 WG_Y, TILE_N = 4 WG_X: 64x64 in general, 32x128 when M is thin), and each invocation
// a 4x4 block of that tile (rows 4 * lid.y + 0..3, columns 4 * lid.x + 0..3), held in registers as
// four vec4 rows. K is walked in 16-wide slabs that the workgroup stages in workgroup memory; for
// each k of a slab an invocation reads one vec4 of A (its 4 rows) and one vec4 of B (its 4
// columns) and adds their outer product to its block: 2 workgroup-memory reads per 16
// multiply-adds, where the one-output-per-invocation kernel (matmul.wgsl) needs 2 per
// multiply-add. M, K and N need not be multiples of the tile: loads outside the matrices read 0,
// and outputs outside them are not stored. The epilogue turns each dot product `acc` into the
// stored value.

{{BINDINGS}}

const M: u32 = {{M}}u;
const K: u32 = {{K}}u;
const N: u32 = {{N}}u;
const BATCH: u32 = {{BATCH}}u;
const TILES_M: u32 = {{TILES_M}}u;
const TILES_N: u32 = {{TILES_N}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
// Output tile rows and columns (4 per invocation each way), their vec4 counts, and the
// K-extent of one staged slab.
const TILE_M: u32 = {{TILE_M}}u;
const TILE_N: u32 = {{TILE_N}}u;
const QM: u32 = TILE_M / 4u;
const QN: u32 = TILE_N / 4u;
const SLAB: u32 = 16u;

// tile_a[p][q] = A[4q .. 4q + 3, k0 + p] (tile rows, slab column p): 4 rows per vec4.
var<workgroup> tile_a: array<array<vec4<f32>, QM>, 16>;
// tile_b[p][q] = B[k0 + p, 4q .. 4q + 3] (slab row p, tile columns): 4 columns per vec4.
var<workgroup> tile_b: array<array<vec4<f32>, QN>, 16>;

{{HELPERS}}

// A[i, p] of output matrix `batch`, or 0 outside A.
fn load_a(batch: u32, i: u32, p: u32) -> f32 {
    if i < M && p < K {
        return a_get(batch, i, p);
    }
    return 0.0;
}

// B[p, j] of output matrix `batch`, or 0 outside B.
fn load_b(batch: u32, p: u32, j: u32) -> f32 {
    if p < K && j < N {
        return b_get(batch, p, j);
    }
    return 0.0;
}

@compute @workgroup_size({{WG_X}}, {{WG_Y}})
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    // Tiles are numbered batch-major, then by row, then by column.
    let tile = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if tile >= BATCH * TILES_M * TILES_N {
        return;
    }
    let batch = tile / (TILES_M * TILES_N);
    let row0 = tile / TILES_N % TILES_M * TILE_M; // first row of the tile
    let col0 = tile % TILES_N * TILE_N; // first column of the tile

    // sums[bi][bj]: the dot product of output (row0 + 4 * lid.y + bi, col0 + 4 * lid.x + bj).
    var sums: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < K; k0 = k0 + SLAB) {
        // Staging: the 256 invocations fill the slabs a vec4 at a time. Vec4 s of A's slab
        // (TILE_M rows x 16) is column s % 16, rows 4 * (s / 16) + 0..3; of B's (16 x TILE_N
        // columns), row s / QN, columns 4 * (s % QN) + 0..3.
        for (var s = t; s < SLAB * QM; s = s + 256u) {
            let ka = k0 + s % SLAB;
            let ra = row0 + 4u * (s / SLAB);
            tile_a[s % SLAB][s / SLAB] = vec4<f32>(
                load_a(batch, ra, ka),
                load_a(batch, ra + 1u, ka),
                load_a(batch, ra + 2u, ka),
                load_a(batch, ra + 3u, ka),
            );
        }
        for (var s = t; s < SLAB * QN; s = s + 256u) {
            let kb = k0 + s / QN;
            let cb = col0 + 4u * (s % QN);
            tile_b[s / QN][s % QN] = vec4<f32>(
                load_b(batch, kb, cb),
                load_b(batch, kb, cb + 1u),
                load_b(batch, kb, cb + 2u),
                load_b(batch, kb, cb + 3u),
            );
        }
        workgroupBarrier();
        for (var p = 0u; p < SLAB; p = p + 1u) {
            // Outer product of this invocation's 4 rows of A and 4 columns of B at k0 + p.
            let av = tile_a[p][lid.y];
            let bv = tile_b[p][lid.x];
            sums[0] = sums[0] + av.x * bv;
            sums[1] = sums[1] + av.y * bv;
            sums[2] = sums[2] + av.z * bv;
            sums[3] = sums[3] + av.w * bv;
        }
        workgroupBarrier();
    }

    // Each output element of the block goes through the epilogue on its own. (The loop counters
    // are not named r and c: `c` is Gemm's C binding.)
    for (var bi = 0u; bi < 4u; bi = bi + 1u) {
        let row = row0 + 4u * lid.y + bi;
        for (var bj = 0u; bj < 4u; bj = bj + 1u) {
            let col = col0 + 4u * lid.x + bj;
            if row < M && col < N {
                // Flat index of the output element, and its dot product.
                let i = (batch * M + row) * N + col;
                let acc = sums[bi][bj];
{{EPILOGUE}}
            }
        }
    }
}
