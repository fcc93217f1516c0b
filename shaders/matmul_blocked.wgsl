// {{KERNEL}}: {{SUMMARY}}
//
// Register-blocked matrix product: {{BATCH}} x ({{M}}x{{K}} @ {{K}}x{{N}}).
// Each workgroup of WG_X x WG_Y (256) invocations computes one TILE_M x TILE_N tile of one output
// matrix, and each invocation a BLOCK x BLOCK block of it (BLOCK = 4 VB: 4x4 in 64x64 tiles, or
// 32x128 / 128x32 ones for thin products; 8x8 in 128x128 tiles for huge products on a GPU), held
// in registers as vec4 rows. K is walked in 16-wide slabs that the workgroup stages in workgroup
// memory; for each k of a slab an invocation reads VB vec4s of A (its rows) and VB of B (its
// columns) and adds their outer product to its block: 2 VB workgroup-memory reads per 16 VB²
// multiply-adds, where the one-output-per-invocation kernel (matmul.wgsl) needs 2 per
// multiply-add. M, K and N need not be multiples of the tile: loads outside the matrices read 0,
// and outputs outside them are not stored. The epilogue turns each dot product `acc` into the
// stored value, and may add a term of each element to the invocation's sum of that column over
// its rows, stored as the invocation's row (WG_Y per tile) of a buffer of such sums.

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
// Invocations per workgroup along columns and rows, vec4s of each per invocation, and the
// block edge an invocation computes (4 VB).
const WG_X: u32 = {{WG_X}}u;
const WG_Y: u32 = {{WG_Y}}u;
const VB: u32 = {{VB}}u;
const BLOCK: u32 = 4u * VB;
const QM: u32 = TILE_M / 4u;
const QN: u32 = TILE_N / 4u;
const SLAB: u32 = 16u;

// tile_a[p][q] = A[4q .. 4q + 3, k0 + p] (tile rows, slab column p): 4 rows per vec4.
var<workgroup> tile_a: array<array<vec4<f32>, QM>, 16>;
// tile_b[p][q] = B[k0 + p, 4q .. 4q + 3] (slab row p, tile columns): 4 columns per vec4.
var<workgroup> tile_b: array<array<vec4<f32>, QN>, 16>;

{{HELPERS}}

{{#SEGMENTS}}
// A[i, p] of output matrix `batch`, or 0 outside A.
fn load_a{{S}}(batch: u32, i: u32, p: u32) -> f32 {
    if i < M && p < K{{S}} {
        return a{{S}}_get(batch, i, p);
    }
    return 0.0;
}

// B[p, j] of output matrix `batch`, or 0 outside B.
fn load_b{{S}}(batch: u32, p: u32, j: u32) -> f32 {
    if p < K{{S}} && j < N {
        return b{{S}}_get(batch, p, j);
    }
    return 0.0;
}

{{/SEGMENTS}}
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

    // sums[4 q + e][cb]: the dot products of output row row0 + 4 * (lid.y + WG_Y * q) + e,
    // q < VB, with columns col0 + 4 * (lid.x + WG_X * cb) + 0..3, cb < VB: this invocation's
    // 4 VB x 4 VB block, in VB x VB vec4 chunks a whole workgroup apart (so neighbouring
    // invocations read neighbouring workgroup memory).
    var sums: array<array<vec4<f32>, VB>, BLOCK>;
    {{#SEGMENTS}}
    for (var k0 = 0u; k0 < K{{S}}; k0 = k0 + SLAB) {
        // Staging: the 256 invocations fill the slabs a vec4 at a time. Vec4 s of A's slab
        // (TILE_M rows x 16) is column s % 16, rows 4 * (s / 16) + 0..3; of B's (16 x TILE_N
        // columns), row s / QN, columns 4 * (s % QN) + 0..3.
        for (var s = t; s < SLAB * QM; s = s + 256u) {
            let ka = k0 + s % SLAB;
            let ra = row0 + 4u * (s / SLAB);
            tile_a[s % SLAB][s / SLAB] = vec4<f32>(
                load_a{{S}}(batch, ra, ka),
                load_a{{S}}(batch, ra + 1u, ka),
                load_a{{S}}(batch, ra + 2u, ka),
                load_a{{S}}(batch, ra + 3u, ka),
            );
        }
        for (var s = t; s < SLAB * QN; s = s + 256u) {
            let kb = k0 + s / QN;
            let cb = col0 + 4u * (s % QN);
            tile_b[s / QN][s % QN] = vec4<f32>(
                load_b{{S}}(batch, kb, cb),
                load_b{{S}}(batch, kb, cb + 1u),
                load_b{{S}}(batch, kb, cb + 2u),
                load_b{{S}}(batch, kb, cb + 3u),
            );
        }
        workgroupBarrier();
        for (var p = 0u; p < SLAB; p = p + 1u) {
            // Outer product of this invocation's 4 VB rows of A and 4 VB columns of B at k0 + p.
            var bv: array<vec4<f32>, VB>;
            for (var cb = 0u; cb < VB; cb = cb + 1u) {
                bv[cb] = tile_b[p][lid.x + WG_X * cb];
            }
            for (var q = 0u; q < VB; q = q + 1u) {
                let av = tile_a[p][lid.y + WG_Y * q];
                for (var cb = 0u; cb < VB; cb = cb + 1u) {
                    sums[4u * q][cb] = sums[4u * q][cb] + av.x * bv[cb];
                    sums[4u * q + 1u][cb] = sums[4u * q + 1u][cb] + av.y * bv[cb];
                    sums[4u * q + 2u][cb] = sums[4u * q + 2u][cb] + av.z * bv[cb];
                    sums[4u * q + 3u][cb] = sums[4u * q + 3u][cb] + av.w * bv[cb];
                }
            }
        }
        workgroupBarrier();
    }
    {{/SEGMENTS}}

    // Each output element of the block goes through the epilogue on its own. (The loop counters
    // are not named r and c: `c` is Gemm's C binding.){{PARTS}}
    for (var bi = 0u; bi < BLOCK; bi = bi + 1u) {
        let row = row0 + 4u * (lid.y + WG_Y * (bi / 4u)) + bi % 4u;
        for (var bj = 0u; bj < BLOCK; bj = bj + 1u) {
            let col = col0 + 4u * (lid.x + WG_X * (bj / 4u)) + bj % 4u;
            if row < M && col < N {
                // Flat index of the output element, and its dot product.
                let i = (batch * M + row) * N + col;
                let acc = sums[bi][bj / 4u][bj % 4u];
{{EPILOGUE}}
            }
        }
    }{{PARTS_STORE_LOOP}}
}
