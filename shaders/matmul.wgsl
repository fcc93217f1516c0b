// {{KERNEL}}: {{SUMMARY}}
//
// Tiled matrix product: {{BATCH}} x ({{M}}x{{K}} @ {{K}}x{{N}}).
// Each 16x16 workgroup computes one 16x16 tile of one output matrix, walking K in 16-wide slabs
// that it stages in workgroup memory (so each input element is read from global memory once per
// tile, not 16 times). M, K and N need not be multiples of 16: loads outside the matrices read 0,
// and invocations outside the output store nothing. The epilogue turns the dot product `acc` into
// the stored value.

{{BINDINGS}}

const M: u32 = {{M}}u;
const K: u32 = {{K}}u;
const N: u32 = {{N}}u;
const BATCH: u32 = {{BATCH}}u;
const TILES_M: u32 = {{TILES_M}}u;
const TILES_N: u32 = {{TILES_N}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
const TILE: u32 = 16u;

var<workgroup> tile_a: array<array<f32, 16>, 16>;
var<workgroup> tile_b: array<array<f32, 16>, 16>;

{{HELPERS}}

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    // Tiles are numbered batch-major, then by row, then by column.
    let tile = (wg.z * GRID_Y + wg.y) * GRID_X + wg.x;
    if tile >= BATCH * TILES_M * TILES_N {
        return;
    }
    let batch = tile / (TILES_M * TILES_N);
    let row = tile / TILES_N % TILES_M * TILE + lid.y;
    let col = tile % TILES_N * TILE + lid.x;

    var acc = 0.0;
    {{#SEGMENTS}}
    for (var k0 = 0u; k0 < K{{S}}; k0 = k0 + TILE) {
        // This invocation stages A[row, k0 + lid.x] and B[k0 + lid.y, col].
        let ka = k0 + lid.x;
        var va = 0.0;
        if row < M && ka < K{{S}} {
            va = a{{S}}_get(batch, row, ka);
        }
        tile_a[lid.y][lid.x] = va;
        let kb = k0 + lid.y;
        var vb = 0.0;
        if kb < K{{S}} && col < N {
            vb = b{{S}}_get(batch, kb, col);
        }
        tile_b[lid.y][lid.x] = vb;
        workgroupBarrier();
        for (var p = 0u; p < TILE; p = p + 1u) {
            acc = acc + tile_a[lid.y][p] * tile_b[p][lid.x];
        }
        workgroupBarrier();
    }
    {{/SEGMENTS}}

    if row < M && col < N {
        // Flat index of the output element.
        let i = (batch * M + row) * N + col;
{{EPILOGUE}}
    }
}
