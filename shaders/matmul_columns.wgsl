// {{KERNEL}}: {{SUMMARY}}
//
// Row-broadcast matrix product for CPU adapters (lavapipe): {{BATCH}} x ({{M}}x{{K}} @ {{K}}x{{N}}).
// A CPU driver runs a workgroup's invocations as the lanes of SIMD registers, and an address that
// differs between lanes costs one scalar load per lane, while one that is the same for the whole
// workgroup costs one load. So every invocation of a workgroup works on the same ROWS rows of A
// (their loads are uniform) and owns its own 4 * VECS columns of B and of the output: per step of
// K it loads ROWS values of A, 4 * VECS of B and does 4 * ROWS * VECS multiply-adds into
// registers. A load of one address by every lane is still dear (lavapipe bounds-checks and
// broadcasts it each time), so where the device has subgroups of one size (STEP lanes), each
// lane loads one of every STEP values a row of A needs and the lanes shuffle them round. No
// workgroup memory and no barriers (on a CPU driver a barrier switches every invocation's
// context). Lane l's columns are 4 * l + 4 * LANES * c + 0..3 of the tile, c < VECS:
// neighbouring lanes read neighbouring memory of a row-major B, and where B's rows of four are
// contiguous and aligned, a lane's four columns are one vec4 load (`b_get4`: on a CPU driver each
// load costs a bounds check and a lane-mask test, whatever its width). Rows and columns past the
// edge of the matrices are clamped for loading (the loop has no branches) and not stored. The
// epilogue turns each dot product `acc` into the stored value, and may add a term of each element
// to its column's sum over the tile's rows, stored as the tile's row of a buffer of such sums: a
// sum over the rows of this output then adds TILES_M values per column, not M. (The loop counters
// are not named r and c: `c` is Gemm's C binding.)

{{BINDINGS}}

const M: u32 = {{M}}u;
const K: u32 = {{K}}u;
const N: u32 = {{N}}u;
const BATCH: u32 = {{BATCH}}u;
const TILES_M: u32 = {{TILES_M}}u;
const TILES_N: u32 = {{TILES_N}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
// Rows of a tile, vec4s of columns per invocation, invocations per workgroup, tile columns.
const ROWS: u32 = {{ROWS}}u;
const VECS: u32 = {{VECS}}u;
const LANES: u32 = {{LANES}}u;
// Steps of K per block of the loop.
const STEP: u32 = {{STEP}}u;
const TILE_N: u32 = 4u * VECS * LANES;

{{HELPERS}}

// The bound of the loops over K and a block's steps, and of the epilogue's over the tile's rows
// and a vec4's columns: `n` itself, or, for a small product, `n` in a form the shader compiler
// cannot evaluate (no buffer holds 2^32 - 1 values, so the select gives `n`), which keeps it
// from unrolling those loops.
fn bound(n: u32) -> u32 {
    return {{BOUND}};
}

@compute @workgroup_size({{LANES}})
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>{{LANE}}) {
    // Tiles are numbered batch-major, then by row, then by column.
    let tile = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if tile >= BATCH * TILES_M * TILES_N {
        return;
    }
    let batch = tile / (TILES_M * TILES_N);
    let row0 = tile / TILES_N % TILES_M * ROWS; // first row of the tile
    let col0 = tile % TILES_N * TILE_N + 4u * lid.x; // this invocation's first column

    // The rows and columns this invocation loads, clamped into the matrices.
    var rows: array<u32, ROWS>;
    for (var ri = 0u; ri < ROWS; ri = ri + 1u) {
        rows[ri] = min(row0 + ri, M - 1u);
    }
    var cols: array<vec4<u32>, VECS>;
    for (var ci = 0u; ci < VECS; ci = ci + 1u) {
        let j = col0 + 4u * LANES * ci;
        cols[ci] = min(vec4<u32>(j, j + 1u, j + 2u, j + 3u), vec4<u32>(N - 1u));
    }{{B_COLUMNS}}

    // sums[ri][ci][ei]: the dot product of output (row0 + ri, col0 + 4 * LANES * ci + ei).
    var sums: array<array<vec4<f32>, VECS>, ROWS>;
    // K in blocks of STEP: 1, or the subgroup size where the lanes share A's values (below).
    {{#SEGMENTS}}
    for (var p0 = 0u; p0 < bound(K{{S}}); p0 = p0 + STEP) {
{{A_BLOCK}}
        for (var pe = 0u; pe < bound({{STEPS}}); pe = pe + 1u) {
            let p = p0 + pe;
            var bv: array<vec4<f32>, VECS>;{{B_STEP}}
            for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                let j = cols[ci];
                bv[ci] = {{B_VALUE}};
            }
            for (var ri = 0u; ri < ROWS; ri = ri + 1u) {
                let av = vec4<f32>({{A_VALUE}});
                for (var ci = 0u; ci < VECS; ci = ci + 1u) {
                    sums[ri][ci] = fma(av, bv[ci], sums[ri][ci]);
                }
            }
        }
    }
    {{/SEGMENTS}}
{{E_COLUMNS}}
    // Each output element goes through the epilogue on its own, a bare product's too: storing
    // a lane's vec4 of sums as four stores in a row, which ran 20% faster at 4 vec4s a lane,
    // made lavapipe blend every accumulator twice per multiply-add at 2 (17.7 against 26.8
    // GFLOP/s at 128 x 768 x 768 transB).{{PARTS}}
    for (var ri = 0u; ri < bound(ROWS); ri = ri + 1u) {
        let row = row0 + ri;
        for (var ci = 0u; ci < VECS; ci = ci + 1u) {
            for (var ei = 0u; ei < bound(4u); ei = ei + 1u) {
                let col = col0 + 4u * LANES * ci + ei;
                if row < M && col < N {
                    // Flat index of the output element, and its dot product.
                    let i = (batch * M + row) * N + col;
                    let acc = sums[ri][ci][ei];
{{EPILOGUE}}
                }
            }
        }
    }{{PARTS_STORE_LOOP}}
}
