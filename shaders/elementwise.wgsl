// {{KERNEL}}: {{SUMMARY}}
//
// Element-wise kernel: {{N}} output elements, PER per invocation (1 on a GPU; on a CPU driver,
// where each workgroup costs a fixed setup, up to 16, so there are up to 16 times fewer
// workgroups, and no more than one workgroup needs).
// Invocation t of a workgroup handles elements first + t + 256 e, e < PER: neighbouring
// invocations touch neighbouring elements. When one grid dimension would exceed the dispatch
// limit the workgroups spill into y (and z); the linear index below undoes that, and the
// elements past the end are skipped.

{{BINDINGS}}

const N: u32 = {{N}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;
const PER: u32 = {{PER}}u;

{{HELPERS}}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let first = ((wg.z * GRID_Y + wg.y) * GRID_X + wg.x) * 256u * PER + lid;{{SCALARS}}
    for (var e = 0u; e < PER; e = e + 1u) {
        let i = first + 256u * e;
        if i < N {
{{BODY}}
        }
    }
}
