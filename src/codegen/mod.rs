//! Code generation: from an IR graph to a [`Plan`] of WGSL kernels and the buffers they read and
//! write. The plan is plain data (no wgpu types), so it can be printed (`dorac compile --emit
//! plan`), snapshot-tested and checked without a GPU; [`crate::runtime`] turns it into pipelines.
//!
//! - A [`Kernel`] computes a group of IR nodes with one dispatch of one shader: an anchor and
//!   the element-wise chain that consumes it, kept in registers. The fusion pass (`fusion`)
//!   chooses the groups; [`plan_grouped`] takes any grouping that keeps its contract.
//! - Shapes are static, so sizes and strides are baked into each shader as constants: no
//!   uniforms, and a kernel reads on its own.
//! - Every shader is parsed and validated by naga ([`validate`]) before anything sees it, so a
//!   codegen bug is an error naming the kernel, not a driver crash.
//! - Each value has a [`BufferSpec`]; intermediates whose lifetimes do not overlap share device
//!   memory (`BufferSpec::storage`, liveness-based), so [`Plan::peak_bytes`] is what a run
//!   allocates and [`Plan::total_bytes`] what it would without reuse.
//! - Persistent state (`Graph::updates`) becomes [`Plan::states`] and the buffer copies
//!   ([`Plan::copies`]) that the runtime records after the kernels of every step.
//!
//! The WGSL text comes from templates under `shaders/` (see `template`), filled by one emitter per
//! family of ops (`kernels`).

mod fusion;
mod kernels;
mod product_sums;
mod schedule;
mod storage;
pub(crate) mod template;
mod thin_products;
mod unhosted;
mod wgsl;

use crate::error::{Error, Result};
use crate::ir::{Graph, NodeId, Op, Stored};
use crate::tensor::{numel, shape_str};
pub use fusion::Fusion;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
pub use thin_products::{has_thin_products, turn_thin_products};
pub use unhosted::{
    plan_hosting_recomputations, undo_unhosted_recomputations, unhosted_recomputations,
};

/// Index of a buffer in [`Plan::buffers`].
pub type BufferId = usize;

/// Why a buffer exists, which decides who fills it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BufferRole {
    /// A graph input, written by every run.
    Input(String),
    /// A constant, uploaded once when the executable is built.
    Const(NodeId),
    /// A value only kernels read and write.
    Intermediate,
    /// A value read back as the named graph output (the first name, when several outputs share
    /// the buffer).
    Output(String),
}

/// One buffer of f32 elements: one value's storage. Several intermediates whose lifetimes do not
/// overlap may share one device allocation (see `storage`).
#[derive(Clone, Debug, PartialEq)]
pub struct BufferSpec {
    /// The IR value it holds (the node's value name), for messages and the plan listing.
    pub name: String,
    pub shape: Vec<usize>,
    /// Element count (f32 each, or 16 bits each when `half`).
    pub len: usize,
    pub role: BufferRole,
    /// A constant stored other than as f32 values (see `storage`): half-precision pairs or
    /// block-quantized codes in `u32` words.
    pub stored: Option<Stored>,
    /// A matrix stored with padded rows (`storage::padded_rows`): the elements from one row's
    /// start to the next's, more than its columns; the padding is zeros.
    pub row_pitch: Option<usize>,
    /// The buffer whose device allocation holds this one: itself when it has its own, or an
    /// earlier intermediate whose last reader has run before this buffer is written (the
    /// planner's liveness-based reuse). Allocations are as large as their owner, which is at
    /// least as large as every buffer stored in it.
    pub storage: BufferId,
}

impl BufferSpec {
    /// Size in bytes. Zero-element values still get a 4-byte buffer, since wgpu cannot bind an
    /// empty one.
    pub fn bytes(&self) -> u64 {
        match (self.stored, self.row_pitch, self.shape.as_slice()) {
            (_, Some(pitch), &[rows, _]) => 4 * (rows * pitch).max(1) as u64,
            (None, ..) => 4 * self.len.max(1) as u64,
            (Some(s), ..) => 4 * s.words(self.len).max(1),
        }
    }
}

/// A graph input whose value lives on the device across runs: after every run, the value of
/// `next` becomes its value (`Graph::updates`).
#[derive(Clone, Debug, PartialEq)]
pub struct StateSpec {
    /// The graph input's name.
    pub name: String,
    /// The state's buffer (an input buffer).
    pub buffer: BufferId,
    /// The buffer holding the value of `next` (a view's source buffer when `next` is a view).
    pub next: BufferId,
}

/// One buffer-to-buffer copy of `bytes` bytes, recorded after all kernels of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct StateCopy {
    pub from: BufferId,
    pub to: BufferId,
    pub bytes: u64,
}

/// One compute dispatch.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// `k03_gemm_layers_0_gemm`: position, op(s), sanitised node label. Stable across runs for
    /// the same graph, so it can name snapshots, profiles and error messages.
    pub name: String,
    /// The IR nodes it computes: the anchor first, then its element-wise epilogue, then the
    /// element-wise chain a sum computes beside its terms (`Fusion::term_chains`), if any.
    pub nodes: Vec<NodeId>,
    /// The nodes' labels (ONNX node names), parallel to `nodes`, for the listing and messages.
    pub labels: Vec<String>,
    /// What it computes, with shapes (also the shader's header comment).
    pub summary: String,
    /// The WGSL source, validated by naga.
    pub source: String,
    /// The buffers of the read-only bindings, in order.
    pub inputs: Vec<BufferId>,
    /// Buffers in each read-only binding, in order, when some binding is an array (a count
    /// above 1 binds that many consecutive `inputs` as one binding array); empty when each
    /// input is a binding of its own.
    pub input_arrays: Vec<u32>,
    /// The read-write binding n: the value of the group's last node.
    pub output: BufferId,
    /// Read-write bindings n+1...: values of interior nodes that readers outside the kernel
    /// need (a DoRA layer's `u`, kept for the magnitude gradient), written as they are computed.
    pub also_writes: Vec<BufferId>,
    /// Workgroup counts for `dispatch_workgroups`; all zero when the output is empty.
    pub workgroups: [u32; 3],
}

impl Kernel {
    /// The read-only bindings, in order: each the buffers it binds (one, or a binding array's).
    pub fn input_bindings(&self) -> Vec<&[BufferId]> {
        if self.input_arrays.is_empty() {
            return self.inputs.chunks(1).collect();
        }
        let mut out = vec![];
        let mut rest = self.inputs.as_slice();
        for &n in &self.input_arrays {
            let (head, tail) = rest.split_at((n as usize).min(rest.len()));
            out.push(head);
            rest = tail;
        }
        out
    }

    /// The buffers in binding order: inputs, then the output, then the other values written.
    pub fn bindings(&self) -> impl Iterator<Item = BufferId> + '_ {
        self.inputs.iter().copied().chain(self.written())
    }

    /// The buffers the kernel writes: its output, then the interior values it also writes.
    pub fn written(&self) -> impl Iterator<Item = BufferId> + '_ {
        std::iter::once(self.output).chain(self.also_writes.iter().copied())
    }
}

/// Knobs of [`plan_with`].
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Workgroups per grid dimension before a dispatch spills into the next dimension. 65535 is
    /// the WebGPU minimum that every adapter supports; tests lower it to exercise the spill
    /// arithmetic on small tensors.
    pub max_workgroups_per_dim: u32,
    /// Fuse element-wise chains into the kernel of the value they consume (see `fusion`); off,
    /// every computing node gets a kernel of its own. On by default; tests turn it off to compare.
    pub fuse: bool,
    /// The kind of adapter the kernels are shaped for (matmul templates differ).
    pub target: Target,
    /// Storage buffers one kernel may bind: [`fusion::PORTABLE_BINDINGS`] for a plan that runs
    /// anywhere, the device's `max_storage_buffers_per_shader_stage` for one made for it (more
    /// room lets fusion go further).
    pub max_bindings: usize,
    /// The device binds arrays of storage buffers (wgpu's `BUFFER_BINDING_ARRAY` and
    /// `STORAGE_RESOURCE_BINDING_ARRAY`): DoRA norms of the same shapes then share one kernel
    /// that reads each layer's weights through arrays (`fusion::batch_norms`). Off in a
    /// portable plan.
    pub binding_arrays: bool,
    /// The device runs kernels in subgroups of exactly this many invocations and has wgpu's
    /// `SUBGROUP` (the adapter's minimum and maximum subgroup sizes agree): the CPU target's
    /// matmuls and DoRA norm then share A's values between invocations by subgroup shuffles and
    /// broadcasts. None in a portable plan.
    pub subgroup_size: Option<u32>,
    /// The most bytes one buffer binding may hold (`max_storage_buffer_binding_size`; WebGPU's
    /// default, 128 MiB, in a portable plan): padding a matrix's rows never takes it past this.
    pub max_buffer_bytes: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            max_workgroups_per_dim: 65_535,
            fuse: true,
            target: Target::Gpu,
            max_bindings: fusion::PORTABLE_BINDINGS,
            binding_arrays: false,
            subgroup_size: None,
            max_buffer_bytes: 128 << 20,
        }
    }
}

/// What runs the kernels, as far as their shape is concerned. Every target computes the same
/// values (the kernel tests check both against the reference); only speed differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Target {
    /// A GPU: matmuls stage tiles in workgroup memory.
    #[default]
    Gpu,
    /// A CPU driver such as lavapipe, which runs a workgroup as SIMD lanes: matmuls broadcast
    /// rows of A to the whole workgroup and give each invocation its own columns, without
    /// workgroup memory or barriers (`shaders/matmul_columns.wgsl`).
    Cpu,
}

impl Target {
    /// Environment variable that overrides the adapter's own kind (`cpu` or `gpu`), for
    /// benchmarks that compare the two kinds of kernel on one device.
    pub const ENV: &'static str = "DORAC_TARGET";

    /// The target for an adapter of `device_type`, unless [`Target::ENV`] says otherwise.
    pub fn for_adapter(device_type: wgpu::DeviceType) -> Target {
        match std::env::var(Self::ENV).as_deref() {
            Ok("cpu") => Target::Cpu,
            Ok("gpu") => Target::Gpu,
            _ if device_type == wgpu::DeviceType::Cpu => Target::Cpu,
            _ => Target::Gpu,
        }
    }
}

/// Everything needed to run a graph on a GPU, as data.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// In execution order.
    pub kernels: Vec<Kernel>,
    pub buffers: Vec<BufferSpec>,
    /// The buffer holding each live node's value. Views share their input's buffer.
    pub node_buffers: BTreeMap<NodeId, BufferId>,
    /// Graph inputs in declaration order, and their buffers.
    pub inputs: Vec<(String, BufferId)>,
    /// Graph outputs in declaration order, and the buffers to read them from.
    pub outputs: Vec<(String, BufferId)>,
    /// The state inputs (a subset of `inputs`), in `Graph::updates` order.
    pub states: Vec<StateSpec>,
    /// The copies that update the state, in the order to record them after the kernels: a copy
    /// that reads a state comes before the one that overwrites it, and states that swap values
    /// go through a snapshot buffer, so every state gets the value its `next` had at the end of
    /// the kernels. States whose `next` shares their buffer need no copy.
    pub copies: Vec<StateCopy>,
}

impl Plan {
    /// Per buffer, the index of the kernel that writes it and of the last kernel that reads it
    /// (`usize::MAX` when a state copy reads it after the kernels); `None` for buffers no kernel
    /// writes (inputs, constants). The span its memory must survive: the planner reuses an
    /// intermediate's allocation only after it.
    pub fn lifetimes(&self) -> Vec<Option<(usize, usize)>> {
        let mut spans: Vec<Option<(usize, usize)>> = vec![None; self.buffers.len()];
        for (k, kernel) in self.kernels.iter().enumerate() {
            for b in kernel.written() {
                spans[b].get_or_insert((k, k));
            }
            for &b in &kernel.inputs {
                if let Some((_, end)) = &mut spans[b] {
                    *end = (*end).max(k);
                }
            }
        }
        for c in &self.copies {
            if let Some((_, end)) = &mut spans[c.from] {
                *end = usize::MAX;
            }
        }
        spans
    }

    /// Bytes the values would take with a buffer each (no reuse).
    pub fn total_bytes(&self) -> u64 {
        self.buffers.iter().map(|b| b.bytes()).sum()
    }

    /// Bytes of device memory actually allocated: one allocation per buffer that owns its
    /// storage, sized for the largest buffer stored in it.
    pub fn peak_bytes(&self) -> u64 {
        self.allocations().values().sum()
    }

    /// The device allocations: for each buffer that owns its storage, the bytes it needs (the
    /// largest of the buffers stored in it).
    pub fn allocations(&self) -> BTreeMap<BufferId, u64> {
        let mut sizes = BTreeMap::new();
        for b in &self.buffers {
            let size = sizes.entry(b.storage).or_insert(0);
            *size = b.bytes().max(*size);
        }
        sizes
    }

    /// True when `name` is a state input.
    pub fn is_state(&self, name: &str) -> bool {
        self.states.iter().any(|s| s.name == name)
    }
}

/// Plans `graph` with the default options: element-wise chains fused into the kernel of the
/// value they consume.
pub fn plan(graph: &Graph) -> Result<Plan> {
    plan_with(graph, &PlanOptions::default())
}

/// [`plan`] with explicit options (`fuse: false` gives one kernel per computing node).
pub fn plan_with(graph: &Graph, options: &PlanOptions) -> Result<Plan> {
    let fusion = fusion::decide(graph, options)?;
    plan_grouped(graph, fusion, options)
}

/// Nodes that need a kernel of their own: everything but inputs, constants and views.
fn has_kernel(op: &Op) -> bool {
    !matches!(op, Op::Input | Op::Const(_)) && !op.is_view()
}

/// Plans `graph` with the given kernel groups: each an anchor node followed by element-wise
/// nodes (and views) of its element count, each reading only values computed before it (e.g.
/// `[matmul, add, relu]`), and the transposes that kernels read in place (a `Vec` of groups has
/// none). Every other live node that needs a kernel must be in exactly one group, and an
/// interior value read outside its group is written beside the group's value (the others stay
/// in registers). [`plan`] gets its groups from the fusion pass.
pub fn plan_grouped(
    graph: &Graph,
    fusion: impl Into<Fusion>,
    options: &PlanOptions,
) -> Result<Plan> {
    let mut fusion: Fusion = fusion.into();
    let order = schedule::order(graph)?;
    let position: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let live = schedule::live(graph);
    let groups = std::mem::take(&mut fusion.groups);
    let groups = check_groups(graph, groups, &fusion, &live, &position, options)?;
    let Fusion {
        operand_transposes: transposed,
        reduce_prologues: prologues,
        term_chains,
        row_pitch: pitch,
        column_sums,
        operand_prologues,
        ..
    } = fusion;
    // Nodes no kernel computes on its own: their readers compute them as they load them.
    let computed_by_readers: HashSet<NodeId> = (prologues.iter().copied())
        .chain(operand_prologues.values().flatten().copied())
        .collect();
    let stored = storage::stored_consts(graph, &transposed, &live);
    let kept = fusion::kept(graph);
    let escapes: BTreeSet<NodeId> = (groups.iter())
        .flat_map(|g| {
            let terms: Vec<NodeId> = fusion::terms_of(&column_sums, g[0]).collect();
            fusion::escaping_with(graph, g, &terms, &live, &kept)
        })
        .chain(
            term_chains
                .values()
                .flat_map(|g| fusion::escaping(graph, g, &live, &kept)),
        )
        .collect();

    let mut plan = Plan::default();
    // Buffers in schedule order; a group's value is its last node's, and interior values read
    // outside the group have buffers too.
    let written = |n: &NodeId| escapes.contains(&fusion::through_views(graph, *n));
    let in_group: HashSet<NodeId> = groups
        .iter()
        .chain(term_chains.values())
        .flat_map(|g| g[..g.len() - 1].iter().copied())
        .filter(|n| !written(n))
        .collect();
    for &n in &order {
        if !live.contains(&n)
            || in_group.contains(&n)
            || transposed.contains(&n)
            || computed_by_readers.contains(&n)
        {
            continue;
        }
        let node = graph.node(n);
        if node.op.is_view() {
            let src = graph.inputs_of(n)[0];
            plan.node_buffers.insert(n, plan.node_buffers[&src]);
            continue;
        }
        if u32::try_from(node.numel()).is_err() {
            return Err(Error::gpu(format!(
                "value '{}' has {} elements, more than the 2^32 that kernels index with u32",
                node.name,
                node.numel()
            )));
        }
        let role = match &node.op {
            Op::Input => BufferRole::Input(node.name.clone()),
            Op::Const(_) => BufferRole::Const(n),
            _ => BufferRole::Intermediate,
        };
        // A term summed per tile of rows holds one row of column sums per tile.
        let (name, shape) = match column_sums.get(&n) {
            Some(c) => (format!("{}/tile_sums", node.name), c.shape(&node.shape)),
            None => (node.name.clone(), node.shape.clone()),
        };
        plan.node_buffers.insert(n, plan.buffers.len());
        plan.buffers.push(BufferSpec {
            name,
            len: numel(&shape),
            shape,
            role,
            stored: stored.get(&n).copied(),
            row_pitch: pitch.get(&n).copied(),
            storage: plan.buffers.len(),
        });
    }
    // Outputs last: a view may make an intermediate buffer an output.
    for (name, n) in graph.outputs() {
        let b = plan.node_buffers[n];
        if plan.buffers[b].role == BufferRole::Intermediate {
            plan.buffers[b].role = BufferRole::Output(name.clone());
        }
        plan.outputs.push((name.clone(), b));
    }
    for &n in graph.inputs() {
        plan.inputs
            .push((graph.node(n).name.clone(), plan.node_buffers[&n]));
    }

    let decisions = kernels::Decisions {
        transposed: &transposed,
        prologues: &prologues,
        term_chains: &term_chains,
        stored: &stored,
        pitch: &pitch,
        escapes: &escapes,
        max_workgroups: options.max_workgroups_per_dim,
        target: options.target,
        subgroup_size: options.subgroup_size,
        column_sums: &column_sums,
        operand_prologues: &operand_prologues,
    };
    // Kernels that differ only in comments (names) are validated once.
    let mut validated = HashSet::new();
    for (index, group) in groups.into_iter().enumerate() {
        let name = kernel_name(graph, index, &group);
        let emitted = kernels::emit(graph, &group, &name, &decisions)?;
        if validated.insert(without_comments(&emitted.source)) {
            validate(&name, &emitted.source)?;
        }
        let last = *group.last().expect("groups are not empty");
        let mut nodes = group;
        nodes.extend(term_chains.get(&nodes[0]).into_iter().flatten());
        nodes.extend(fusion::terms_of(&column_sums, nodes[0]));
        let loaded = (graph.inputs_of(nodes[0]).into_iter())
            .map(|i| match transposed.contains(&i) {
                true => graph.inputs_of(i)[0],
                false => i,
            })
            .filter_map(|i| operand_prologues.get(&i));
        nodes.extend(loaded.flatten().collect::<Vec<_>>());
        plan.kernels.push(Kernel {
            name,
            summary: emitted.summary,
            source: emitted.source,
            inputs: emitted
                .inputs
                .iter()
                .map(|n| plan.node_buffers[n])
                .collect(),
            output: plan.node_buffers[&last],
            input_arrays: emitted.input_arrays,
            also_writes: emitted
                .writes
                .iter()
                .map(|n| plan.node_buffers[n])
                .collect(),
            workgroups: emitted.workgroups,
            labels: nodes.iter().map(|&n| graph.node(n).label.clone()).collect(),
            nodes,
        });
    }
    plan_state(graph, &mut plan)?;
    reuse_buffers(&mut plan);
    Ok(plan)
}

/// Fills [`Plan::states`] and [`Plan::copies`] from `Graph::updates`, after checking them: each
/// state is a distinct graph input, and its `next` has as many elements.
fn plan_state(graph: &Graph, plan: &mut Plan) -> Result<()> {
    let bad = |m: String| Err(Error::graph(format!("state update: {m}")));
    for &(state, next) in graph.updates() {
        if !graph.contains(state) || !graph.contains(next) {
            return bad("a (state, next) pair names a node that is not in the graph".into());
        }
        let node = graph.node(state);
        if !matches!(node.op, Op::Input) || !graph.inputs().contains(&state) {
            return bad(format!(
                "'{}' is a {} node, not a graph input",
                node.name,
                node.op.name()
            ));
        }
        if plan.is_state(&node.name) {
            return bad(format!("'{}' is updated twice", node.name));
        }
        let next_node = graph.node(next);
        if next_node.numel() != node.numel() {
            return bad(format!(
                "'{}' ({}) cannot take the value of '{}' ({})",
                node.name,
                shape_str(&node.shape),
                next_node.name,
                shape_str(&next_node.shape)
            ));
        }
        plan.states.push(StateSpec {
            name: node.name.clone(),
            buffer: plan.node_buffers[&state],
            next: plan.node_buffers[&next],
        });
    }
    // Copies run in order, so a copy that reads a state's buffer must come before the copy that
    // overwrites it: emit first the copies whose target no pending copy reads. When only cycles
    // are left (states that swap values), snapshot one target into a buffer of its own.
    let mut pending: Vec<StateCopy> = plan
        .states
        .iter()
        .filter(|s| s.next != s.buffer && plan.buffers[s.buffer].len > 0)
        .map(|s| StateCopy {
            from: s.next,
            to: s.buffer,
            bytes: 4 * plan.buffers[s.buffer].len as u64,
        })
        .collect();
    while !pending.is_empty() {
        let ready = pending
            .iter()
            .position(|c| !pending.iter().any(|o| o.from == c.to));
        if let Some(i) = ready {
            plan.copies.push(pending.remove(i));
            continue;
        }
        let victim = pending[0].to;
        let src = &plan.buffers[victim];
        let snapshot = plan.buffers.len();
        plan.buffers.push(BufferSpec {
            name: format!("{} (before the update)", src.name),
            shape: src.shape.clone(),
            len: src.len,
            role: BufferRole::Intermediate,
            stored: None,
            row_pitch: None,
            storage: snapshot,
        });
        plan.copies.push(StateCopy {
            from: victim,
            to: snapshot,
            bytes: pending[0].bytes,
        });
        for c in pending.iter_mut().filter(|c| c.from == victim) {
            c.from = snapshot;
        }
    }
    Ok(())
}

/// Kernels after its writer within which a value counts as short-lived for [`reuse_buffers`].
const SHORT_LIFETIME: usize = 2;

/// Liveness-based buffer reuse: walking the kernels in order, an intermediate's storage becomes
/// free once the last kernel reading it has run, and a later kernel's output takes the smallest
/// free allocation that is large enough (or a new one), unless it is under half that size and
/// long-lived. Inputs, constants, outputs, snapshots and
/// every buffer a state copy reads keep their own allocation. A kernel's output never shares its
/// own inputs' storage: a storage is freed only after the kernel, so wgpu never sees one buffer
/// bound read-only and read-write in the same dispatch.
fn reuse_buffers(plan: &mut Plan) {
    let copy_sources: HashSet<BufferId> = plan.copies.iter().map(|c| c.from).collect();
    let snapshots: HashSet<BufferId> = plan.copies.iter().map(|c| c.to).collect();
    let reusable = |b: BufferId, spec: &BufferSpec| {
        spec.role == BufferRole::Intermediate
            && !copy_sources.contains(&b)
            && !snapshots.contains(&b)
    };
    // The last kernel that reads each buffer (or writes it, when nothing reads it).
    let mut last_use: HashMap<BufferId, usize> = HashMap::new();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for b in kernel.bindings() {
            last_use.insert(b, k);
        }
    }
    // The kernel that first writes each reusable buffer, and its size: (kernel, bytes).
    let mut births: Vec<(usize, u64)> = vec![];
    let mut born: HashSet<BufferId> = HashSet::new();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for out in kernel.written() {
            if reusable(out, &plan.buffers[out]) && born.insert(out) {
                births.push((k, plan.buffers[out].bytes()));
            }
        }
    }
    // Free allocations: (bytes, owner).
    let mut free: Vec<(u64, BufferId)> = vec![];
    let mut assigned: HashSet<BufferId> = HashSet::new();
    for (k, kernel) in plan.kernels.iter().enumerate() {
        for out in kernel.written().collect::<Vec<_>>() {
            if !reusable(out, &plan.buffers[out]) || !assigned.insert(out) {
                continue;
            }
            let bytes = plan.buffers[out].bytes();
            // A value under half an allocation's size takes it only when it dies soon, and when
            // the values that would fill such an allocation and are written while it lives find
            // others free: a small long-lived value (DoRA's x A^T, kept for backward) would
            // otherwise pin a large allocation that later activations need, and a short-lived
            // one (the last layer's x A^T) the one that a gradient written while it lives needs;
            // they would each take a new one.
            let dies = last_use[&out];
            let lends = |size: u64, owner: BufferId| {
                let needed = (births.iter())
                    .filter(|&&(at, b)| at > k && at <= dies && b <= size && 2 * b > size)
                    .count();
                let spare = (free.iter())
                    .filter(|&&(s, o)| o != owner && s >= size)
                    .count();
                dies <= k + SHORT_LIFETIME && needed <= spare
            };
            let best = free
                .iter()
                .enumerate()
                .filter(|(_, &(size, owner))| {
                    size >= bytes && (size <= 2 * bytes.max(1) || lends(size, owner))
                })
                .min_by_key(|(_, &(size, owner))| (size, owner))
                .map(|(i, _)| i);
            if let Some(i) = best {
                let (_, owner) = free.swap_remove(i);
                plan.buffers[out].storage = owner;
            }
        }
        let mut released: Vec<BufferId> = kernel
            .bindings()
            .filter(|&b| last_use[&b] == k && reusable(b, &plan.buffers[b]))
            .collect();
        released.sort();
        released.dedup();
        for b in released {
            // The owner was the allocation's first buffer, and later ones are no larger.
            let owner = plan.buffers[b].storage;
            free.push((plan.buffers[owner].bytes(), owner));
        }
    }
}

/// Checks the group contract of [`plan_grouped`] and puts the groups into execution order
/// ([`execution_order`]).
fn check_groups(
    graph: &Graph,
    groups: Vec<Vec<NodeId>>,
    fusion: &Fusion,
    live: &BTreeSet<NodeId>,
    position: &HashMap<NodeId, usize>,
    options: &PlanOptions,
) -> Result<Vec<Vec<NodeId>>> {
    let max_bindings = options.max_bindings;
    let (transposed, prologues) = (&fusion.operand_transposes, &fusion.reduce_prologues);
    let term_chains = &fusion.term_chains;
    let bad = |m: String| Err(Error::graph(format!("kernel groups: {m}")));
    let mut seen = HashSet::new();
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, n)| *n).collect();
    let kept = fusion::kept(graph);
    for g in &groups {
        if g.is_empty() {
            return bad("an empty group".into());
        }
        if let Some(Err(why)) = product_sums::summed(graph, g, live, &kept) {
            let label = &graph.node(g[0]).label;
            return bad(format!(
                "the group of '{label}' sums two products, but {why}"
            ));
        }
        for (k, &n) in g.iter().enumerate() {
            let interior = k + 1 < g.len();
            // A view may pass a value on between two nodes of a group, in registers.
            let passed_view = graph.contains(n) && k > 0 && interior && graph.node(n).op.is_view();
            if !graph.contains(n)
                || !(has_kernel(&graph.node(n).op) || passed_view)
                || transposed.contains(&n)
                || prologues.contains(&n)
            {
                return bad(format!("node {} needs no kernel", n.index()));
            }
            if !seen.insert(n) {
                return bad(format!("node '{}' is in two groups", graph.node(n).label));
            }
            // An interior value read outside its group is written by the kernel too; its readers
            // then need the kernel (`execution_order` runs them after it, or refuses a cycle).
            let outside: Vec<NodeId> = graph
                .consumers(n)
                .into_iter()
                .filter(|c| live.contains(c) && !g.contains(c))
                .collect();
            if !interior || (outside.is_empty() && !outputs.contains(&n)) {
                continue;
            }
            // A view's readers read its source's buffer: the source must be the group's to write.
            if passed_view && !g[..k].contains(&graph.inputs_of(n)[0]) {
                return bad(format!(
                    "the view '{}' is read outside its group, but its source is not in it",
                    graph.node(n).label
                ));
            }
        }
    }
    for &t in transposed {
        let ok = !outputs.contains(&t)
            && !graph.updates().iter().any(|&(_, next)| next == t)
            && fusion::readable_in_place(graph, t, live);
        if !ok {
            return bad(format!(
                "node '{}' cannot be read in place by its readers",
                graph.node(t).label
            ));
        }
    }
    for &p in prologues {
        if !graph.contains(p) || !fusion::is_reduce_prologue(graph, p, live, &kept, max_bindings) {
            return bad(format!(
                "node {} cannot be computed by the reduction that reads it",
                p.index()
            ));
        }
    }
    // An operand prologue: element-wise nodes of one element count, no group's, the last read
    // by products alone (directly or through transposes read in place), the others by the
    // chain alone.
    for (&value, chain) in &fusion.operand_prologues {
        let product = |n: NodeId| {
            matches!(graph.node(n).op, Op::MatMul | Op::Gemm { .. })
                && groups.iter().any(|g| g[0] == n)
        };
        let readers_of = |n: NodeId| -> Vec<NodeId> {
            (graph.consumers(n).into_iter())
                .filter(|c| live.contains(c))
                .collect()
        };
        let loaded = readers_of(value).into_iter().all(|r| {
            product(r) || (transposed.contains(&r) && readers_of(r).into_iter().all(product))
        });
        let fits = loaded
            && chain.last() == Some(&value)
            && chain.iter().all(|&n| {
                let elementwise = kernels::is_elementwise(&graph.node(n).op)
                    && graph.node(n).numel() == graph.node(value).numel();
                let inner = n == value || readers_of(n).iter().all(|r| chain.contains(r));
                elementwise && inner && !seen.contains(&n) && !prologues.contains(&n)
            });
        if !fits {
            return bad(format!(
                "the products reading '{}' cannot compute it as they load it",
                graph.node(value).label
            ));
        }
    }
    for (host, chain) in term_chains {
        let x = graph.inputs_of(*host).first().copied();
        let group = groups.iter().find(|g| g[0] == *host);
        // The chain runs as the terms load and the sum's epilogue after them: neither may read
        // the other's values in registers of the same kernel.
        let host_reads: HashSet<NodeId> = group
            .into_iter()
            .flatten()
            .chain(x.iter().filter(|x| prologues.contains(x)))
            .flat_map(|&n| graph.inputs_of(n))
            .collect();
        let independent = chain.iter().all(|&n| {
            !host_reads.contains(&n)
                && graph
                    .inputs_of(n)
                    .iter()
                    .all(|i| !group.is_some_and(|g| g.contains(i)))
        });
        let fits = group.is_some()
            && independent
            && kernels::is_sum(&graph.node(*host).op)
            && x.is_some_and(|x| chain.first().map(|&c| graph.shape(c)) == Some(graph.shape(x)))
            && chain.iter().all(|&n| {
                let op = &graph.node(n).op;
                (kernels::is_elementwise(op) || op.is_view())
                    && graph.node(n).numel() == graph.node(chain[0]).numel()
            });
        if !fits {
            return bad(format!(
                "the sum '{}' cannot compute an element-wise chain beside its terms",
                graph.node(*host).label
            ));
        }
        for &n in chain {
            if !has_kernel(&graph.node(n).op) && !graph.node(n).op.is_view()
                || transposed.contains(&n)
                || prologues.contains(&n)
                || !seen.insert(n)
            {
                return bad(format!(
                    "node '{}' in a term chain is in another group or needs no kernel",
                    graph.node(n).label
                ));
            }
        }
    }
    for (&t, sum) in &fusion.column_sums {
        if !graph.contains(t) || !graph.contains(sum.product) {
            return bad(format!(
                "column sums of node {} out of the graph",
                t.index()
            ));
        }
        let product = groups.iter().find(|g| g[0] == sum.product);
        let readers: Vec<NodeId> = (graph.consumers(t).into_iter())
            .filter(|c| live.contains(c))
            .collect();
        let summed = matches!(readers.as_slice(), [r] if kernels::is_sum(&graph.node(*r).op)
            && matches!(&graph.node(*r).op, Op::Reduce { axes, .. }
                if fusion::over_rows(axes, graph.shape(t)))
            && groups.iter().any(|g| g.contains(r)));
        let shape = graph.shape(t);
        let tiles = kernels::row_tiles(graph, sum.product, options.target, options.subgroup_size);
        let fits = product.is_some_and(|g| {
            let anchor = graph.node(g[0]);
            (graph.inputs_of(t).iter()).any(|&i| g.contains(&fusion::through_views(graph, i)))
                && !g.contains(&t)
                && anchor.numel() == numel(shape)
                && anchor.shape.last() == shape.last()
        }) && summed
            && kernels::is_elementwise(&graph.node(t).op)
            && !kept.contains(&t)
            && tiles == Some(sum.tiles)
            && !seen.contains(&t)
            && !prologues.contains(&t)
            && !transposed.contains(&t);
        if !fits {
            return bad(format!(
                "the product '{}' cannot sum '{}' over its tiles of rows for the sum reading it",
                graph.node(sum.product).label,
                graph.node(t).label
            ));
        }
    }
    if let Some(&n) = live.iter().find(|&&n| {
        has_kernel(&graph.node(n).op)
            && !seen.contains(&n)
            && !transposed.contains(&n)
            && !prologues.contains(&n)
            && !fusion.column_sums.contains_key(&n)
            && !fusion.operand_prologues.values().flatten().any(|&c| c == n)
    }) {
        return bad(format!("node '{}' is in no group", graph.node(n).label));
    }
    execution_order(graph, groups, fusion, position)
}

/// The groups in the order their kernels run: each after the kernels that compute what it
/// reads, and among those ready, the one whose anchor comes first in the schedule. A kernel
/// thus runs as soon as its inputs allow, not where its last node is scheduled: a sum whose
/// epilogue is a late optimizer update (DoRA's magnitude gradient and m's AdamW step) still
/// runs right after its terms are computed, and they die there. Groups from the fusion pass
/// never read each other's values (`fusion::fits` keeps a group's outside readers after its
/// last node); hand-made groups that do are refused.
fn execution_order(
    graph: &Graph,
    groups: Vec<Vec<NodeId>>,
    fusion: &Fusion,
    position: &HashMap<NodeId, usize>,
) -> Result<Vec<Vec<NodeId>>> {
    let members = fusion::kernel_members(&groups, &fusion.term_chains, &fusion.column_sums);
    // The groups whose values group g reads: through views, transposes read in place and
    // reduction prologues, which have no kernel, to the kernels that computed their sources.
    let needs = fusion::kernel_needs(graph, &members);
    let readers = fusion::readers(&needs);
    // A group's urgency: its anchor's position; for a group that reads no other group's value
    // (AdamW's `lr * wd` from the step's scalars, say), its earliest reader's when that is
    // earlier, so that a kernel scheduled late for no reason of its own does not hold back its
    // readers (DoRA's magnitude gradient, whose epilogue updates m). Sources only: urgency that
    // flowed back through a chain would let the whole backward pass overtake kernels that free
    // its activations. Readers are settled first: a pass over a topological order, backwards.
    let topological = fusion::topological(&needs, &readers);
    let mut urgency: Vec<usize> = groups.iter().map(|g| position[&g[0]]).collect();
    for &g in topological.iter().rev() {
        if needs[g].is_empty() {
            for &r in &readers[g] {
                urgency[g] = urgency[g].min(urgency[r]);
            }
        }
    }
    // Among the kernels ready to run, first one that reads no kernel's values (AdamW's step
    // scalars: its readers wait for it) or is the last reader of another's (their buffers can
    // then be reused), then the most urgent. A gradient product whose epilogue updates a
    // parameter is urgent by nothing: its anchor comes late in the schedule. But it is often
    // the last reader of an activation and of the gradient it multiplies, which would
    // otherwise stay allocated through the rest of the backward pass.
    let mut waiting: Vec<usize> = needs.iter().map(BTreeSet::len).collect();
    let mut unread: Vec<usize> = readers.iter().map(Vec::len).collect();
    let mut ready: Vec<usize> = (0..groups.len()).filter(|&g| waiting[g] == 0).collect();
    let mut order = Vec::with_capacity(groups.len());
    while !ready.is_empty() {
        let frees = |g: usize| needs[g].is_empty() || needs[g].iter().any(|&h| unread[h] == 1);
        let key = |g: usize| (!frees(g), urgency[g], position[&groups[g][0]], g);
        let (at, &g) = (ready.iter().enumerate())
            .min_by_key(|&(_, &g)| key(g))
            .expect("ready is not empty");
        ready.swap_remove(at);
        order.push(g);
        for &h in &needs[g] {
            unread[h] -= 1;
        }
        for &r in &readers[g] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.push(r);
            }
        }
    }
    if order.len() != groups.len() {
        let stuck = (0..groups.len()).find(|g| !order.contains(g)).unwrap_or(0);
        return Err(Error::graph(format!(
            "kernel groups: the group of '{}' and the groups it reads read each other's values",
            graph.node(groups[stuck][0]).label
        )));
    }
    let mut groups: Vec<Option<Vec<NodeId>>> = groups.into_iter().map(Some).collect();
    Ok(order.into_iter().filter_map(|g| groups[g].take()).collect())
}

/// `k{index}_{ops}_{label}`, lowercase ASCII, at most ~60 characters; a group of several
/// layers (batched DoRA norms) is named after its first, with `_x{layers}` after its ops.
fn kernel_name(graph: &Graph, index: usize, group: &[NodeId]) -> String {
    let first_op = &graph.node(group[0]).op;
    let layers = group
        .iter()
        .filter(|&&n| {
            matches!(first_op, Op::DoraNormSq(_) | Op::Reduce { .. })
                && graph.node(n).op == *first_op
        })
        .count();
    let first_layer = group[1..]
        .iter()
        .position(|&n| layers > 1 && graph.node(n).op == *first_op)
        .map_or(group.len(), |p| p + 1);
    let mut ops: Vec<String> = group[..first_layer]
        .iter()
        .map(|&n| graph.node(n).op.name().to_string())
        .collect();
    if layers > 1 {
        ops.push(format!("x{layers}"));
    }
    let anchor = graph.node(group[0]);
    let mut label = sanitize(&anchor.label);
    if label.is_empty() {
        label = sanitize(&anchor.name);
    }
    if label.is_empty() {
        label = format!("n{}", group[0].index());
    }
    format!("k{index:02}_{}_{label}", ops.join("_"))
}

/// Lowercase ASCII letters, digits and single underscores, at most 40 characters.
fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = if c.is_ascii_alphanumeric() {
            c.to_ascii_lowercase()
        } else {
            '_'
        };
        if c == '_' && (out.is_empty() || out.ends_with('_')) {
            continue;
        }
        out.push(c);
    }
    let mut out = out.trim_end_matches('_').to_string();
    if out.len() > 40 {
        out.truncate(40);
        out = out.trim_end_matches('_').to_string();
    }
    out
}

/// WGSL `source` without its comments and blank lines: what the driver compiles. (WGSL has no
/// string literals, so `//` always starts a comment.)
pub fn without_comments(source: &str) -> String {
    let mut code = String::with_capacity(source.len());
    for line in source.lines() {
        let line = line.split("//").next().unwrap_or("").trim_end();
        if !line.is_empty() {
            code.push_str(line);
            code.push('\n');
        }
    }
    code
}

/// Parses and validates a WGSL kernel with naga, as wgpu would, so that a codegen bug surfaces
/// here as an [`Error::Gpu`] naming the kernel and quoting naga's diagnostic, instead of a panic
/// or a driver error later.
pub fn validate(name: &str, source: &str) -> Result<()> {
    let path = format!("{name}.wgsl");
    let module = naga::front::wgsl::parse_str(source).map_err(|e| {
        Error::gpu(format!(
            "kernel {name}: generated WGSL does not parse:\n{}",
            e.emit_to_string_with_path(source, &path)
        ))
    })?;
    // Binding arrays of storage buffers and subgroup broadcasts, shuffles and sums are allowed:
    // plans use them only for devices that have them (`PlanOptions::binding_arrays`,
    // `PlanOptions::subgroup_size`; wgpu's `SUBGROUP` includes all three).
    let capabilities = naga::valid::Capabilities::default()
        | naga::valid::Capabilities::BUFFER_BINDING_ARRAY
        | naga::valid::Capabilities::STORAGE_BUFFER_BINDING_ARRAY
        | naga::valid::Capabilities::SUBGROUP;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), capabilities)
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .subgroup_operations(
            naga::valid::SubgroupOperationSet::BALLOT
                | naga::valid::SubgroupOperationSet::SHUFFLE
                | naga::valid::SubgroupOperationSet::ARITHMETIC,
        )
        .validate(&module)
        .map_err(|e| {
            Error::gpu(format!(
                "kernel {name}: generated WGSL is invalid:\n{}",
                e.emit_to_string_with_path(source, &path)
            ))
        })?;
    Ok(())
}

impl fmt::Display for Plan {
    /// The plan as `dorac compile --emit plan` prints it: kernels in order with the nodes they
    /// compute and the buffers they touch, then the buffers with their sizes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let buf = |b: BufferId| format!("b{b} '{}'", self.buffers[b].name);
        let allocations = self.allocations().len();
        writeln!(
            f,
            "plan: {} kernels, {} buffers in {allocations} allocations, {} of values, {} allocated",
            self.kernels.len(),
            self.buffers.len(),
            human_bytes(self.total_bytes()),
            human_bytes(self.peak_bytes())
        )?;
        writeln!(f, "kernels:")?;
        for k in &self.kernels {
            let [x, y, z] = k.workgroups;
            writeln!(f, "  {}  ({x}x{y}x{z} workgroups)", k.name)?;
            writeln!(f, "      {}", k.summary)?;
            let nodes: Vec<String> = k
                .nodes
                .iter()
                .zip(&k.labels)
                .map(|(n, l)| format!("#{} '{l}'", n.index()))
                .collect();
            let reads: Vec<String> = k.inputs.iter().map(|&b| buf(b)).collect();
            let writes: Vec<String> = k.written().map(buf).collect();
            writeln!(f, "      nodes {}", nodes.join(", "))?;
            writeln!(
                f,
                "      reads {}; writes {}",
                reads.join(", "),
                writes.join(", ")
            )?;
        }
        writeln!(
            f,
            "buffers (lifetime: from the kernel that writes it to the last that reads it):"
        )?;
        let lifetimes = self.lifetimes();
        let last = self.kernels.len().saturating_sub(1);
        for (i, b) in self.buffers.iter().enumerate() {
            let life = match (&b.role, lifetimes[i]) {
                (BufferRole::Input(_) | BufferRole::Const(_), _) => "whole run".to_string(),
                (BufferRole::Output(_), Some((first, _))) => format!("k{first:02}-end"),
                (_, Some((first, end))) if end == usize::MAX => format!("k{first:02}-end"),
                (_, Some((first, end))) => format!("k{first:02}-k{:02}", end.min(last)),
                (_, None) => "never written".to_string(),
            };
            let mut role = match &b.role {
                BufferRole::Input(name) if self.is_state(name) => "state".to_string(),
                BufferRole::Input(_) => "input".to_string(),
                BufferRole::Const(n) => format!("const #{}", n.index()),
                BufferRole::Intermediate => "intermediate".into(),
                BufferRole::Output(name) => format!("output '{name}'"),
            };
            if let Some(h) = b.stored {
                role += &format!(", stored as {}", h.name());
            }
            if let Some(p) = b.row_pitch {
                role += &format!(", rows padded to {p}");
            }
            if b.storage != i {
                role += &format!(", in b{}'s memory", b.storage);
            }
            writeln!(
                f,
                "  b{i:<3} {:<24} {:<12} {:>10} bytes  {life:<9}  {role}",
                format!("'{}'", b.name),
                shape_str(&b.shape),
                b.bytes(),
            )?;
        }
        if !self.states.is_empty() {
            writeln!(f, "state updates, after the kernels:")?;
            for c in &self.copies {
                writeln!(
                    f,
                    "  copy {} -> {} ({} bytes)",
                    buf(c.from),
                    buf(c.to),
                    c.bytes
                )?;
            }
            for s in self.states.iter().filter(|s| s.next == s.buffer) {
                writeln!(f, "  {} is its own next value: no copy", buf(s.buffer))?;
            }
        }
        for (name, b) in &self.outputs {
            writeln!(f, "output '{name}' <- b{b}")?;
        }
        writeln!(f, "total: {} bytes", self.total_bytes())?;
        writeln!(f, "allocated: {} bytes", self.peak_bytes())
    }
}

/// `1.5 MiB` style.
fn human_bytes(n: u64) -> String {
    let units = ["bytes", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{unary, Binary, GraphBuilder};
    use crate::tensor::Tensor;

    fn sample() -> (GraphBuilder, Vec<NodeId>) {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![3, 4]);
        let w = g.add_const("w", Tensor::f32(vec![4, 5], vec![0.5; 20]));
        let bias = g.add_const("bias", Tensor::f32(vec![5], vec![1.0; 5]));
        let mm = g
            .add(Op::MatMul, &[x, w], "mm", "/layers.0/MatMul")
            .unwrap();
        let add = g
            .add(Op::Binary(Binary::Add), &[mm, bias], "add", "add")
            .unwrap();
        let relu = g.add(Op::Unary(unary::RELU), &[add], "h", "relu").unwrap();
        let r = g
            .add(Op::Reshape { shape: vec![15] }, &[relu], "y", "flatten")
            .unwrap();
        g.add_output("y", r);
        (g, vec![mm, add, relu, r])
    }

    #[test]
    fn one_kernel_per_computing_node_and_views_alias() {
        let (g, n) = sample();
        let unfused = PlanOptions {
            fuse: false,
            ..PlanOptions::default()
        };
        let p = plan_with(&g, &unfused).unwrap();
        let names: Vec<&str> = p.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(
            names,
            ["k00_matmul_layers_0_matmul", "k01_add_add", "k02_relu_relu"]
        );
        assert_eq!(p.node_buffers[&n[3]], p.node_buffers[&n[2]]);
        assert_eq!(p.outputs, vec![("y".to_string(), p.node_buffers[&n[2]])]);
        assert_eq!(
            p.buffers[p.node_buffers[&n[2]]].role,
            BufferRole::Output("y".into())
        );
        let text = p.to_string();
        assert!(text.contains("k01_add_add"), "{text}");
        // Fused (the default), the chain is one kernel writing the view's buffer.
        let fused = plan(&g).unwrap();
        let names: Vec<&str> = fused.kernels.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["k00_matmul_add_relu_layers_0_matmul"]);
        assert_eq!(
            fused.outputs,
            vec![("y".to_string(), fused.node_buffers[&n[2]])]
        );
    }

    #[test]
    fn fused_groups_validate_and_interior_values_get_no_buffer_unless_read_outside() {
        let (g, n) = sample();
        let p = plan_grouped(&g, vec![vec![n[0], n[1], n[2]]], &PlanOptions::default()).unwrap();
        assert_eq!(p.kernels.len(), 1);
        assert_eq!(p.kernels[0].name, "k00_matmul_add_relu_layers_0_matmul");
        assert!(!p.node_buffers.contains_key(&n[0]));
        assert!(p.kernels[0].source.contains("let v2 = max(v1, 0.0);"));
        let opts = PlanOptions::default();
        assert!(plan_grouped(&g, vec![vec![n[0], n[1]], vec![n[2]]], &opts).is_ok());
        let missing = plan_grouped(&g, vec![vec![n[0]], vec![n[1]]], &opts).unwrap_err();
        assert!(missing.to_string().contains("in no group"), "{missing}");
        // An interior value that is an output is written beside the kernel's output.
        let (mut g2, n2) = sample();
        g2.add_output("mm", n2[0]);
        let p = plan_grouped(&g2, vec![vec![n2[0], n2[1], n2[2]]], &opts).unwrap();
        assert_eq!(p.kernels[0].also_writes, [p.node_buffers[&n2[0]]]);
        assert!(
            p.kernels[0].source.contains("y0[i] = v0;"),
            "{}",
            p.kernels[0].source
        );
        // One read by a kernel that must run before the group's (the group needs its value)
        // is refused: the two kernels would need each other.
        let (mut g3, n3) = sample();
        let neg = g3
            .add(Op::Unary(unary::NEG), &[n3[0]], "neg", "neg")
            .unwrap();
        let both = g3
            .add(Op::Binary(Binary::Add), &[n3[1], neg], "both", "both")
            .unwrap();
        g3.add_output("both", both);
        let groups = vec![vec![n3[0], n3[1], both], vec![neg], vec![n3[2]]];
        let early = plan_grouped(&g3, groups, &opts).unwrap_err();
        assert!(
            early.to_string().contains("read each other's values"),
            "{early}"
        );
    }

    /// Hand-made term chains are checked: a chain beside a sum of its own shape plans (the sum's
    /// kernel writes the chain's value), one that reads the sum it would run in, or beside a
    /// node that is not a sum, is refused.
    #[test]
    fn term_chains_are_checked() {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![6, 70]);
        let sum = Op::Reduce {
            kind: crate::ir::Reduce::Sum,
            axes: vec![0],
            keepdims: true,
        };
        let s = g.add(sum, &[x], "s", "s").unwrap();
        let neg = g.add(Op::Unary(unary::NEG), &[x], "neg", "neg").unwrap();
        let centered = g.add(Op::Binary(Binary::Sub), &[x, s], "c", "c").unwrap();
        g.add_output("s", s);
        g.add_output("neg", neg);
        g.add_output("c", centered);
        let fusion = |host: NodeId, chain: Vec<NodeId>, groups: Vec<Vec<NodeId>>| Fusion {
            groups,
            term_chains: [(host, chain)].into(),
            ..Fusion::default()
        };
        let opts = PlanOptions::default();
        let ok = fusion(s, vec![neg], vec![vec![s], vec![centered]]);
        let plan = plan_grouped(&g, ok, &opts).unwrap();
        assert_eq!(plan.kernels.len(), 2, "{plan}");
        assert_eq!(plan.kernels[0].nodes, [s, neg]);
        assert_eq!(plan.kernels[0].also_writes, [plan.node_buffers[&neg]]);
        for bad in [
            fusion(s, vec![centered], vec![vec![s], vec![neg]]),
            fusion(neg, vec![centered], vec![vec![s], vec![neg]]),
        ] {
            let e = plan_grouped(&g, bad, &opts).unwrap_err().to_string();
            assert!(e.contains("cannot compute an element-wise chain"), "{e}");
        }
    }

    /// A chain of element-wise ops with a state update: intermediates reuse freed memory, while
    /// inputs, outputs and the buffer the state copy reads keep theirs.
    #[test]
    fn chains_reuse_memory_and_state_copies_are_planned() {
        let mut g = GraphBuilder::new();
        let p = g.add_input("p", vec![8]);
        let next = g.add(Op::Unary(unary::NEG), &[p], "next", "next").unwrap();
        let mut v = next;
        for i in 0..4 {
            v = g
                .add(Op::Unary(unary::EXP), &[v], &format!("e{i}"), "e")
                .unwrap();
        }
        let small = g
            .add(Op::Reshape { shape: vec![2, 4] }, &[v], "r", "r")
            .unwrap();
        let s = g
            .add(
                Op::Reduce {
                    kind: crate::ir::Reduce::Sum,
                    axes: vec![1],
                    keepdims: false,
                },
                &[small],
                "s",
                "s",
            )
            .unwrap();
        let y = g.add(Op::Unary(unary::RELU), &[s], "y", "y").unwrap();
        g.add_output("y", y);
        g.add_update(p, next);
        // Unfused, so that the chain's intermediates get buffers to reuse.
        let unfused = PlanOptions {
            fuse: false,
            ..PlanOptions::default()
        };
        let plan = plan_with(&g, &unfused).unwrap();
        let text = plan.to_string();
        let b = |n: NodeId| plan.node_buffers[&n];
        // e0 and e1 take fresh memory; e2 reuses e0's, e3 e1's, and s (smaller) e2's.
        let storage = |n: NodeId| plan.buffers[b(n)].storage;
        assert_eq!(storage(next), b(next), "{text}");
        let e: Vec<NodeId> = (0..4)
            .map(|i| g.find_by_name(&format!("e{i}")).unwrap())
            .collect();
        assert_eq!(storage(e[0]), b(e[0]), "{text}");
        assert_eq!(storage(e[2]), b(e[0]), "{text}");
        assert_eq!(storage(e[3]), b(e[1]), "{text}");
        assert_eq!(storage(s), b(e[0]), "{text}");
        assert_eq!(plan.total_bytes(), 6 * 32 + 8 + 8, "{text}");
        assert_eq!(plan.peak_bytes(), 4 * 32 + 8, "{text}");
        assert_eq!(
            plan.copies,
            vec![StateCopy {
                from: b(next),
                to: b(p),
                bytes: 32
            }]
        );
        for needle in [
            "in 5 allocations, 208 bytes of values, 136 bytes allocated",
            "intermediate, in b3's memory",
            "b0   'p'                      8                    32 bytes  whole run  state",
            "state updates, after the kernels:\n  copy b1 'next' -> b0 'p' (32 bytes)",
            "total: 208 bytes\nallocated: 136 bytes",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
    }

    /// A kernel runs as soon as what it reads is computed, not where its last node is
    /// scheduled: a sum whose epilogue reads a scalar computed late in the schedule (built last,
    /// like AdamW's `lr * wd`) runs before the matmul chain, so the activation it sums dies
    /// there instead of living to the end; the scalar's kernel is pulled forward for it.
    #[test]
    fn a_kernel_runs_when_its_inputs_are_ready() {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![8, 8]);
        let w = g.add_const("w", Tensor::f32(vec![8, 8], vec![0.125; 64]));
        let a = g.add(Op::Unary(unary::TANH), &[x], "a", "a").unwrap();
        let sum = |axes: Vec<usize>| Op::Reduce {
            kind: crate::ir::Reduce::Sum,
            axes,
            keepdims: false,
        };
        let s = g.add(sum(vec![0]), &[a], "s", "s").unwrap();
        let mut m = a;
        for i in 0..3 {
            let name = format!("m{i}");
            m = g.add(Op::MatMul, &[m, w], &name, &name).unwrap();
        }
        g.add_output("m", m);
        let q = g.add_input("q", vec![8]);
        let k = g.add(sum(vec![0]), &[q], "k", "k").unwrap();
        let t = g.add(Op::Binary(Binary::Mul), &[s, k], "t", "t").unwrap();
        g.add_output("t", t);
        let g = g.finish();
        let plan = plan(&g).unwrap();
        let kernel_of = |n: NodeId| plan.kernels.iter().position(|k| k.nodes.contains(&n));
        let text = plan.to_string();
        let (s_at, k_at, m0_at) = (
            kernel_of(s).unwrap(),
            kernel_of(k).unwrap(),
            kernel_of(g.find_by_name("m0").unwrap()).unwrap(),
        );
        assert_eq!(kernel_of(t), Some(s_at), "t is the sum's epilogue:\n{text}");
        assert!(k_at < s_at && s_at < m0_at, "{text}");
    }

    /// The plan of `g` with one kernel per node, and its text for messages.
    fn unfused_plan(g: &Graph) -> (Plan, String) {
        let unfused = PlanOptions {
            fuse: false,
            ..PlanOptions::default()
        };
        let plan = plan_with(g, &unfused).unwrap();
        let text = plan.to_string();
        (plan, text)
    }

    /// A small value that lives long (DoRA's x A^T, kept for backward) takes memory of its own
    /// instead of a freed allocation many times its size, which the next activation then
    /// reuses; so does a small value that dies at once where a value written while it lives
    /// needs the only allocation free (t, and f). The allocations: x's, a's (256 bytes, later
    /// c's and e's), b's (later d's and f's), y's, and the 4 bytes of s and of t.
    #[test]
    fn a_small_long_lived_value_does_not_pin_a_large_allocation() {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![64]);
        let tanh = |g: &mut GraphBuilder, v: NodeId, name: &str| {
            g.add(Op::Unary(unary::TANH), &[v], name, name).unwrap()
        };
        let a = tanh(&mut g, x, "a");
        let b = tanh(&mut g, a, "b");
        let sum = Op::Reduce {
            kind: crate::ir::Reduce::Sum,
            axes: vec![0],
            keepdims: true,
        };
        // s: written once a is dead, read by the last kernel.
        let s = g.add(sum.clone(), &[b], "s", "s").unwrap();
        let c = tanh(&mut g, b, "c");
        let d = tanh(&mut g, c, "d");
        let e = tanh(&mut g, d, "e");
        // t: as small, read by the very next kernel.
        let t = g.add(sum, &[e], "t", "t").unwrap();
        let f = g.add(Op::Binary(Binary::Add), &[e, t], "f", "f").unwrap();
        let y = g.add(Op::Binary(Binary::Add), &[f, s], "y", "y").unwrap();
        g.add_output("y", y);
        let g = g.finish();
        let (plan, text) = unfused_plan(&g);
        let buffer = |n: NodeId| plan.node_buffers[&n];
        let storage = |n: NodeId| plan.buffers[buffer(n)].storage;
        assert_eq!(storage(s), buffer(s), "{text}");
        assert_eq!(storage(c), buffer(a), "{text}");
        assert_eq!(storage(t), buffer(t), "{text}");
        assert_eq!(storage(f), buffer(b), "{text}");
        assert_eq!(plan.peak_bytes(), 256 * 4 + 4 + 4, "{text}");
    }
    /// A small value that dies at once takes a freed allocation many times its size where the
    /// values written while it lives find others: p's and q's are free when t is written, t
    /// takes p's and f, written while t lives, q's.
    #[test]
    fn a_small_short_lived_value_reuses_an_allocation_no_one_needs() {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![64]);
        let p = g.add(Op::Unary(unary::TANH), &[x], "p", "p").unwrap();
        let q = g.add(Op::Unary(unary::EXP), &[x], "q", "q").unwrap();
        let r = g.add(Op::Binary(Binary::Add), &[p, q], "r", "r").unwrap();
        let sum = Op::Reduce {
            kind: crate::ir::Reduce::Sum,
            axes: vec![0],
            keepdims: true,
        };
        let t = g.add(sum, &[r], "t", "t").unwrap();
        let f = g.add(Op::Binary(Binary::Add), &[r, t], "f", "f").unwrap();
        let y = g.add(Op::Unary(unary::TANH), &[f], "y", "y").unwrap();
        g.add_output("y", y);
        let g = g.finish();
        let (plan, text) = unfused_plan(&g);
        let buffer = |n: NodeId| plan.node_buffers[&n];
        let storage = |n: NodeId| plan.buffers[buffer(n)].storage;
        assert_eq!(storage(t), buffer(p), "{text}");
        assert_eq!(storage(f), buffer(q), "{text}");
        assert_eq!(plan.peak_bytes(), 256 * 5, "{text}");
    }

    #[test]
    fn validate_names_the_kernel_and_quotes_naga() {
        let e = validate("k07_bad", "fn main() { let x: f32 = 1u; }").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("k07_bad"), "{msg}");
        assert!(msg.starts_with("gpu: kernel k07_bad"), "{msg}");
    }

    #[test]
    fn sanitised_names() {
        assert_eq!(sanitize("/encoder/layer.0/Gemm"), "encoder_layer_0_gemm");
        assert_eq!(sanitize("__"), "");
    }
}
