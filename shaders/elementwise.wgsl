// {{KERNEL}}: {{SUMMARY}}
//
// Element-wise kernel: one invocation per output element, {{N}} in all. When one grid dimension
// would exceed the dispatch limit the workgroups spill into y (and z); the linear index below
// undoes that, and the invocations past the end do nothing.

{{BINDINGS}}

const N: u32 = {{N}}u;
const GRID_X: u32 = {{GRID_X}}u;
const GRID_Y: u32 = {{GRID_Y}}u;

{{HELPERS}}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = ((wg.z * GRID_Y + wg.y) * GRID_X + wg.x) * 256u + lid;
    if i >= N {
        return;
    }
{{BODY}}
}
