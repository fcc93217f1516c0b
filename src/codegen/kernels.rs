//! The WGSL emitters: one per family of ops, each filling one template from `shaders/`.
//!
//! A kernel computes a *group* of IR nodes: an anchor (any op with a kernel) followed by an
//! element-wise epilogue chain, each node consuming the previous one's value (e.g. MatMul -> Add
//! bias -> Relu). The epilogue is applied to the anchor's value in registers, so the intermediate
//! values never reach memory. The fusion pass (`super::fusion`) chooses the groups; any grouping
//! that keeps the contract of [`super::plan_grouped`] renders.
//!
//! Adding an op: an arm in [`emit`] (or in [`elementwise_expr`] for an element-wise op), and a
//! template under `shaders/` when no existing one fits.

use super::fusion::ColumnSum;
use super::product_sums;
use super::storage;
use super::template::{self, Lib};
use super::wgsl::{self, broadcast_index, broadcast_strides, strided_index, Binding};
use super::Target;
use crate::error::{Error, Result};
use crate::ir::op::matmul_dims;
use crate::ir::{Graph, NodeId, Op, Reduce, Stored};
use crate::tensor::DType;
use crate::tensor::{numel, shape_str, strides};
use std::collections::{BTreeMap, BTreeSet};

/// Invocations per workgroup of the element-wise template.
const ELEMENTWISE_WG: usize = 256;
/// The most terms a CPU target's sum adds serially in one invocation (see `reduce`); longer
/// sums keep the workgroup tree, whose pairwise sums lose less to rounding.
const REDUCE_LANES_MAX: usize = 4096;
/// The CPU target's sum template (one invocation per output).
const REDUCE_SUM_LANES: template::Template = template::Template {
    name: "reduce_sum_lanes.wgsl",
    text: include_str!("../../shaders/reduce_sum_lanes.wgsl"),
};
/// Elements per invocation of the element-wise template on a CPU target.
const ELEMENTWISE_PER_CPU: usize = 16;
/// Output tile edge of the matmul template (one output per invocation).
const TILE: usize = 16;
/// Output tile edge of the register-blocked matmul template (a 4x4 block per invocation).
const BLOCKED_TILE: usize = 64;
/// Products with at most this many rows (a batch of tokens against a wide weight: GPT-2's LM
/// head is 32 x 50257) take the blocked template's 32 x 128 tile, which a 64-row tile would
/// leave half empty; products with at most this many columns, 128 x 32 (see `blocked_tile`).
const THIN_M: usize = 32;
/// A matmul whose output matrices hold at least BLOCKED_MIN² elements, with both sides at least
/// [`BLOCKED_MIN_SIDE`], uses the register-blocked template. Thin products such as DoRA's
/// `A W0` (r x out) or `x Aᵀ` (rows x r) with r >= 16 still gain from it despite a partly empty
/// tile (measured on lavapipe: the blocked kernel runs about 6x faster, a 16-wide tile wastes
/// 75%); tiny ones (r = 4, a 1-D operand, 4x16 @ 16x2) keep the 16x16 template.
const BLOCKED_MIN: usize = BLOCKED_TILE;
/// Products with both output sides at least this large, and [`WIDE_MIN_OUTPUT`] outputs, take
/// 128 x 128 tiles of 8x8 blocks on a GPU target.
const WIDE_TILE: usize = 128;
/// 256 tiles of 128 x 128. Measured on an H200 (Vulkan): 2048² and 4096² products gain 5-6%
/// over 64 x 64 tiles; 1024² (64 tiles) lost 12% and 128 x 3072 (24 tiles) 55%, too few
/// workgroups for 132 multiprocessors.
const WIDE_MIN_OUTPUT: usize = 2048 * 2048;
/// The smallest output side the blocked template takes (see [`BLOCKED_MIN`]).
const BLOCKED_MIN_SIDE: usize = 16;
/// Rows of the columns template's tile (see [`MatmulShape::Columns`]). Lavapipe, 4 vec4s x 8
/// lanes, `cargo bench --bench matmul` (512³ / 128 x 768 x 3072): 4 rows 19 / 18 GFLOP/s, 8 rows
/// 29 / 29, 12 rows 25 / 34, 16 rows 34 / 38, 24 or 32 rows 6 / 6 (LLVM no longer keeps the
/// unrolled loop's values in registers and spills every step).
const COLUMNS_ROWS: usize = 16;
/// The most multiply-adds of a kernel whose CPU template keeps its main loops rolled (`bound` in
/// `matmul_columns.wgsl`: over K, a block's steps, the tile's rows and a vec4's columns; in
/// `dora_norm_columns.wgsl`: over input features, a block's steps and a vec4's features). A CPU
/// driver compiles a kernel at its first dispatch, and unrolled, each step's loads become a
/// bounds-checked load per lane and component. On lavapipe, Swin's 2 x 16 x 64 @ 64 x 32
/// product with DoRA's low-rank term and scale took 1.8 s to compile unrolled and 0.65 s
/// rolled; a 2 x 32 @ 32 x 8 one, 1.9 s and 0.4 s; the norms of four 16 x 16 layers at rank 8,
/// 2.3 s and 0.7 s. Rolled, the 128 x 512 x 512 products of the train bench ran about 4%
/// slower; at 4M multiply-adds (0.3 ms) that is some 13 µs a step, and a second of compilation
/// is paid back after about 75,000 steps.
const ROLLED_MAX_MACS: usize = 1 << 22;
/// The body of a CPU template's `bound(n)`, the bound of its main loops, for a kernel of `macs`
/// multiply-adds: `n`, or for a small kernel `n` hidden from the shader compiler, which then
/// keeps the loops rolled ([`ROLLED_MAX_MACS`]).
fn loop_bound(macs: usize) -> &'static str {
    match macs <= ROLLED_MAX_MACS {
        true => "select(n, 0u, arrayLength(&y) == 0xffffffffu)",
        false => "n",
    }
}

/// Output features per workgroup of the DoRA norm's CPU template without subgroups, in the
/// row-broadcast shape the matmul had when it was written.
const NORM_ROWS: usize = 8;
/// The longest softmax row that takes one invocation (`softmax_rows.wgsl`) rather than a
/// workgroup (`softmax.wgsl`). Lavapipe, MiniLM's attention (384 rows of 16): 0.93 ms as
/// workgroups, 0.12 ms as invocations.
const SHORT_SOFTMAX: usize = 64;
/// The narrowest output the columns template takes: narrower ones (DoRA's `x Aᵀ` at rank 16)
/// would leave most of a SIMD register's lanes idle.
const COLUMNS_MIN_N: usize = 4;
/// The row-broadcast matmul template for CPU targets.
const MATMUL_COLUMNS: template::Template = template::Template {
    name: "matmul_columns.wgsl",
    text: include_str!("../../shaders/matmul_columns.wgsl"),
};
/// Several layers' sums of column sums in one dispatch (see `reduce_layers`).
const REDUCE_SUM_LAYERS: template::Template = template::Template {
    name: "reduce_sum_layers.wgsl",
    text: include_str!("../../shaders/reduce_sum_layers.wgsl"),
};
/// The register-blocked matmul template (not in `template`'s list: only this emitter uses it).
const MATMUL_BLOCKED: template::Template = template::Template {
    name: "matmul_blocked.wgsl",
    text: include_str!("../../shaders/matmul_blocked.wgsl"),
};

/// For the emitters whose inputs are never transposes read in place (see `fusion`).
static NO_TRANSPOSES: BTreeSet<NodeId> = BTreeSet::new();

/// A rendered kernel, before the plan assigns buffers to its bindings.
pub(crate) struct Emitted {
    /// One line on what the kernel computes (shapes included), for the plan and the shader header.
    pub summary: String,
    pub source: String,
    pub workgroups: [u32; 3],
    /// The values the kernel reads, in binding order (the output binding comes after them).
    pub inputs: Vec<NodeId>,
    /// Buffers of each input binding, in order (see `Kernel::input_arrays`); empty when every
    /// input is a binding of its own.
    pub input_arrays: Vec<u32>,
    /// Interior values of the group that readers outside it need, written beside the output
    /// (their bindings follow the output's).
    pub writes: Vec<NodeId>,
}

/// What an emitter accumulates besides its template's own text.
struct Builder<'g> {
    graph: &'g Graph,
    /// Transposes read in place (see `fusion`): a load of one reads its source.
    transposed: &'g BTreeSet<NodeId>,
    inputs: Vec<(String, NodeId)>,
    /// Interior values the kernel also writes (see [`Emitted::writes`]).
    writes: Vec<(String, NodeId)>,
    /// Bound values stored other than as f32 (`storage`): declared `array<u32>`.
    stored: BTreeMap<NodeId, Stored>,
    libs: BTreeSet<Lib>,
    helpers: Vec<String>,
    /// Prefix of the bindings declared now: a kernel computing several layers at once (see
    /// `dora_norm`) names each layer's bindings apart.
    scope: String,
    /// Binding arrays: (index in `inputs` of the first buffer, buffers).
    arrays: Vec<(usize, usize)>,
    /// Bound values whose buffer holds something else than the value (a term's column sums
    /// per tile of rows, `fusion`'s column sums), with the shape it has: for the comments.
    shapes: BTreeMap<NodeId, Vec<usize>>,
    /// Sections of the template repeated with values of their own (`template::repeat`).
    sections: Vec<(&'static str, Vec<template::Instance>)>,
    /// While an operand prologue or an epilogue is rendered for the columns template, or an
    /// element-wise kernel: the loads made before the loop instead of in it (see
    /// [`ColumnLoads`]).
    column_loads: Option<ColumnLoads>,
    /// Bindings declared `array<vec4<f32>>` (a product's B read by quads, see
    /// [`ProductDims::b_quads`]), which element-wise loads do not share.
    quads: BTreeSet<String>,
}

/// The loads of an operand prologue or a product's epilogue that depend on the column alone (a
/// per-feature scale or bias broadcast over the rows, DoRA's `g` and `b` in `relu(g * u + b)`),
/// which the columns template makes once per column instead of once per element: for B once per
/// column of a lane, before its K loop; for A once per step of K, not once per row; for the
/// epilogue once per column of a lane, before the loop over the tile. Of the value whose last
/// axis is `n` long; one load serves every read of the same value.
struct ColumnLoads {
    n: usize,
    /// Where the loaded values are read.
    read: ColumnRead,
    loads: Vec<ColumnLoad>,
}

/// Where the values of [`ColumnLoads`] are read.
#[derive(Clone, Copy, PartialEq)]
enum ColumnRead {
    /// In a prologue's load helper, which takes them as the fields of a struct `c`.
    Helper,
    /// In the epilogue, from arrays of a lane's columns, `[ci][ei]` as the lane's sums.
    Lanes,
    /// In an element-wise kernel, whose elements have no column in common: scalars alone,
    /// loaded before the loop over an invocation's elements.
    Scalars,
}

/// One load of [`ColumnLoads`]: the value bound as `bound`, read as `name`.
struct ColumnLoad {
    name: String,
    bound: String,
    /// A value of one element: its load does not depend on the column at all.
    scalar: bool,
}

impl ColumnLoad {
    /// The load at column `index`.
    fn at(&self, index: &str) -> String {
        let index = if self.scalar { "0u" } else { index };
        format!("{}[{index}]", self.bound)
    }
}

impl<'g> Builder<'g> {
    fn new(graph: &'g Graph, transposed: &'g BTreeSet<NodeId>) -> Self {
        Builder {
            graph,
            transposed,
            inputs: vec![],
            writes: vec![],
            stored: BTreeMap::new(),
            libs: BTreeSet::new(),
            helpers: vec![],
            scope: String::new(),
            arrays: vec![],
            shapes: BTreeMap::new(),
            sections: vec![],
            column_loads: None,
            quads: BTreeSet::new(),
        }
    }

    /// [`bind`](Builder::bind) for a value that may be stored other than as f32; returns the
    /// binding's name and its storage (for [`storage::stored_load`]).
    fn bind_stored(
        &mut self,
        name: &str,
        node: NodeId,
        stored: &BTreeMap<NodeId, Stored>,
    ) -> (String, Option<Stored>) {
        let format = stored.get(&node).copied();
        if let Some(f) = format {
            self.mark_stored(node, f);
        }
        (self.bind(name, node), format)
    }

    /// The bound `node` is stored as `format`: its binding is `array<u32>`, and the kernel
    /// takes the decoding library.
    fn mark_stored(&mut self, node: NodeId, format: Stored) {
        self.stored.insert(node, format);
        self.libs.insert(match format {
            Stored::Half(_) => Lib::Half,
            Stored::Blocks(_) => Lib::Blocks,
        });
    }

    /// Declares an input binding named `name` (after the scope) holding `node`'s value;
    /// returns the name.
    fn bind(&mut self, name: &str, node: NodeId) -> String {
        let name = format!("{}{name}", self.scope);
        self.inputs.push((name.clone(), node));
        name
    }

    /// Declares one binding array named `name` holding `nodes`' values (each of the same shape
    /// and storage), read as `name[k].v[i]`; returns the name.
    fn bind_array(&mut self, name: &str, nodes: &[NodeId]) -> String {
        let name = format!("{}{name}", self.scope);
        self.arrays.push((self.inputs.len(), nodes.len()));
        self.inputs.extend(nodes.iter().map(|&n| (name.clone(), n)));
        name
    }

    /// True when input `i` is a buffer of a binding array.
    fn in_array(&self, i: usize) -> bool {
        self.arrays
            .iter()
            .any(|&(start, n)| (start..start + n).contains(&i))
    }

    /// The node whose buffer a read of `node` binds, and the permutation to read it through:
    /// the source of a transpose read in place, or `node` itself.
    fn source(&self, node: NodeId) -> (NodeId, Option<&'g [usize]>) {
        if self.transposed.contains(&node) {
            if let Op::Transpose { perm } = &self.graph.node(node).op {
                return (self.graph.inputs_of(node)[0], Some(perm));
            }
        }
        (node, None)
    }

    /// A statement loading the element of `node` that output element `i` (of `out_shape`)
    /// reads, broadcasting as element-wise ops do, into `{name}_i`; returns (statement, the
    /// loaded value's name). Loads of one value share a binding (named after the first).
    fn load(
        &mut self,
        name: &str,
        node: NodeId,
        out_shape: &[usize],
        indent: &str,
    ) -> (String, String) {
        let (src, perm) = self.source(node);
        let existing = (self.inputs.iter().enumerate())
            .find(|&(i, (name, n))| *n == src && !self.in_array(i) && !self.quads.contains(name));
        let bound = match existing {
            Some((_, (existing, _))) => existing.clone(),
            None => self.bind(name, src),
        };
        let from = self.graph.shape(node);
        if let Some(read) = self.column_load(name, &bound, from, perm) {
            let value = format!("{name}_i");
            let note = match self.column_loads.as_ref().map(|c| c.read) {
                Some(ColumnRead::Helper) => " // loaded once per column, by the _column helper",
                Some(ColumnRead::Scalars) => " // loaded once, before the loop",
                _ => " // loaded once per column, before the tile's rows",
            };
            return (format!("{indent}let {value} = {read};{note}"), value);
        }
        let (index, note) = match perm {
            None => (
                broadcast_index("i", from, out_shape),
                wgsl::broadcast_note(from, out_shape),
            ),
            Some(perm) => {
                let own = permuted_strides(self.graph.shape(src), perm);
                let muls = broadcast_strides(from, &own, out_shape);
                (
                    strided_index("i", out_shape, &muls),
                    format!(" // transpose by {perm:?} read in place"),
                )
            }
        };
        let value = format!("{name}_i");
        (
            format!("{indent}let {value} = {bound}[{index}];{note}"),
            value,
        )
    }

    /// While column loads are gathered (`column_loads`), and where a value of shape `from`
    /// bound as `bound` depends on the column alone (a scalar, or a vector along the last axis
    /// read in its own layout), records its load and returns the expression that reads the
    /// loaded value; None otherwise.
    fn column_load(
        &mut self,
        name: &str,
        bound: &str,
        from: &[usize],
        perm: Option<&[usize]>,
    ) -> Option<String> {
        let columns = self.column_loads.as_mut()?;
        let scalar = numel(from) == 1;
        let vector = from.last() == Some(&columns.n) && from.iter().rev().skip(1).all(|&d| d == 1);
        let vector = vector && columns.read != ColumnRead::Scalars;
        if perm.is_some() || !(scalar || vector) {
            return None;
        }
        let same = |l: &&ColumnLoad| l.bound == bound && l.scalar == scalar;
        let name = match columns.loads.iter().find(same) {
            Some(load) => load.name.clone(),
            None => {
                let name = format!("{name}_c");
                columns.loads.push(ColumnLoad {
                    name: name.clone(),
                    bound: bound.to_string(),
                    scalar,
                });
                name
            }
        };
        Some(match (columns.read, scalar) {
            (ColumnRead::Helper, _) => format!("c.{name}"),
            (ColumnRead::Lanes | ColumnRead::Scalars, true) => name,
            (_, false) => format!("{name}[ci][ei]"),
        })
    }

    fn bindings(&self, out: NodeId) -> String {
        let binding = |name: &str, n: NodeId| {
            let node = self.graph.node(n);
            Binding {
                name: name.to_string(),
                value: node.name.clone(),
                packed: self.stored.get(&n).map(|h| h.words_note()),
                count: 1,
                quads: self.quads.contains(name),
                shape: self.shapes.get(&n).unwrap_or(&node.shape).clone(),
            }
        };
        let mut inputs: Vec<Binding> = vec![];
        for (i, (s, n)) in self.inputs.iter().enumerate() {
            match self.arrays.iter().find(|&&(start, _)| start == i) {
                Some(&(_, count)) => inputs.push(Binding {
                    count,
                    ..binding(s, *n)
                }),
                None if self.in_array(i) => {}
                None => inputs.push(binding(s, *n)),
            }
        }
        let outputs: Vec<Binding> = std::iter::once(binding("y", out))
            .chain(self.writes.iter().map(|(s, n)| binding(s, *n)))
            .collect();
        wgsl::bindings(&inputs, &outputs)
    }

    fn helpers(&self) -> String {
        let mut parts: Vec<&str> = self.libs.iter().map(|l| l.source().trim_end()).collect();
        parts.extend(self.helpers.iter().map(|h| h.trim_end()));
        parts.join("\n\n")
    }

    fn finish(
        self,
        template: template::Template,
        kernel: &str,
        out: NodeId,
        mut values: Vec<(&str, String)>,
        workgroups: [u32; 3],
        summary: String,
    ) -> Result<Emitted> {
        values.push(("KERNEL", kernel.to_string()));
        values.push(("SUMMARY", wgsl::comment_safe(&summary)));
        values.push(("BINDINGS", self.bindings(out)));
        values.push(("HELPERS", self.helpers()));
        let mut text = std::borrow::Cow::Borrowed(template.text);
        for (section, instances) in &self.sections {
            text = template::repeat(template.name, &text, section, instances)?.into();
        }
        let source = tidy(&template::render(template.name, &text, &values)?);
        let input_arrays = if self.arrays.is_empty() {
            vec![]
        } else {
            let mut counts = vec![];
            let mut i = 0;
            while i < self.inputs.len() {
                let n = (self.arrays.iter())
                    .find(|&&(start, _)| start == i)
                    .map_or(1, |&(_, n)| n);
                counts.push(n as u32);
                i += n;
            }
            counts
        };
        Ok(Emitted {
            summary,
            source,
            workgroups,
            input_arrays,
            inputs: self.inputs.into_iter().map(|(_, n)| n).collect(),
            writes: self.writes.into_iter().map(|(_, n)| n).collect(),
        })
    }
}

/// Collapses runs of blank lines (left by empty placeholders) into one.
fn tidy(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut blank = 0;
    for line in source.lines() {
        let line = line.trim_end();
        blank = if line.is_empty() { blank + 1 } else { 0 };
        if blank < 2 {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// What the planner decided for the whole graph that an emitter may need.
pub(crate) struct Decisions<'p> {
    /// Transposes the kernels read in place (see `fusion`): a matmul or element-wise kernel
    /// that reads one binds its source.
    pub transposed: &'p BTreeSet<NodeId>,
    /// Element-wise nodes computed by the reduction that reads them (see `fusion`).
    pub prologues: &'p BTreeSet<NodeId>,
    /// Element-wise chains that a sum computes beside its terms, by the sum's anchor.
    pub term_chains: &'p BTreeMap<NodeId, Vec<NodeId>>,
    /// Constants stored other than as f32 values (see `storage`).
    pub stored: &'p BTreeMap<NodeId, Stored>,
    /// Matrices stored with padded rows, by their row pitch (see `storage::padded_rows`).
    pub pitch: &'p BTreeMap<NodeId, usize>,
    /// Interior values of groups that are read outside their group (see `fusion::escaping`):
    /// the kernel writes them beside its output.
    pub escapes: &'p BTreeSet<NodeId>,
    /// The per-dimension dispatch limit the grid must respect.
    pub max_workgroups: u32,
    pub target: Target,
    /// The device's one subgroup size, where kernels may use subgroup operations
    /// (`PlanOptions::subgroup_size`).
    pub subgroup_size: Option<u32>,
    /// Terms that a product's kernel sums over each tile of its rows (see `fusion`), by term.
    pub column_sums: &'p BTreeMap<NodeId, ColumnSum>,
    /// Values that the products reading them compute as they load them (see `fusion`), with
    /// the element-wise chain that computes each.
    pub operand_prologues: &'p BTreeMap<NodeId, Vec<NodeId>>,
}

/// Renders the kernel named `name` that computes `group` (anchor first, then its epilogue).
pub(crate) fn emit(graph: &Graph, group: &[NodeId], name: &str, d: &Decisions) -> Result<Emitted> {
    let max_workgroups = d.max_workgroups;
    let anchor = group[0];
    let node = graph.node(anchor);
    if group.len() > 1 && !takes_epilogue(&node.op) {
        return Err(Error::gpu(format!(
            "kernel {name}: a {} cannot take an element-wise epilogue",
            node.op.name()
        )));
    }
    match &node.op {
        op if is_elementwise(op) || is_index_map(op) => elementwise(graph, group, name, d),
        Op::MatMul | Op::Gemm { .. } => matmul(graph, group, name, d),
        Op::Reduce { kind, axes, .. } => reduce(graph, group, *kind, axes, name, d),
        Op::LayerNorm { axis, epsilon } => {
            layer_norm(graph, anchor, *axis, *epsilon, name, max_workgroups)
        }
        Op::Softmax { axis } => softmax(graph, anchor, *axis, name, max_workgroups),
        Op::DoraNormSq(p) => dora_norm(graph, group, p, name, d),
        &Op::SoftmaxCrossEntropy {
            ignore_index,
            shift,
        } => cross_entropy(graph, anchor, ignore_index, shift, name, max_workgroups),
        &Op::SoftmaxCrossEntropyGrad {
            ignore_index,
            shift,
        } => cross_entropy(graph, anchor, ignore_index, shift, name, max_workgroups),
        op => Err(Error::gpu(format!(
            "kernel {name}: a {} node has no kernel (emitter bug)",
            op.name()
        ))),
    }
}

/// Ops whose kernel can apply an element-wise epilogue to its value (the anchors of fused
/// groups): the element-wise and index-mapping ops, MatMul and Gemm.
pub(super) fn takes_epilogue(op: &Op) -> bool {
    is_elementwise(op)
        || is_index_map(op)
        || matches!(op, Op::MatMul | Op::Gemm { .. } | Op::DoraNormSq(_))
        || is_sum(op)
}

/// Reductions rendered by the sum templates, which run an epilogue on each output element
/// (DoRA's magnitude gradient `sum(dY * u)` then scales itself and updates m in one kernel).
pub(super) fn is_sum(op: &Op) -> bool {
    let sum_template = |kind: &Reduce| kind.def().wgsl.template.name == template::REDUCE_SUM.name;
    matches!(op, Op::Reduce { kind, .. } if sum_template(kind))
}

/// Ops that compute each output element from the same-index (broadcast) elements of their
/// inputs: they can anchor an element-wise kernel or sit in another kernel's epilogue.
pub(super) fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_)
            | Op::Binary(_)
            | Op::UnaryGrad(_)
            | Op::Expand { .. }
            | Op::Cast { .. }
            | Op::Where
    )
}

/// Ops that compute each output element from input elements found by index arithmetic on the
/// output position (layout changes and gathers): they run on the element-wise template with
/// their own loads, and can anchor an epilogue.
fn is_index_map(op: &Op) -> bool {
    matches!(
        op,
        Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Gather { .. }
            | Op::GatherElements { .. }
            | Op::GatherND { .. }
            | Op::Trilu { .. }
    )
}

/// A bool result (1.0 or 0.0) of a WGSL condition.
fn truth(cond: String) -> String {
    format!("select(0.0, 1.0, {cond})")
}

/// The WGSL expression of an element-wise op with a result of type `dtype` applied to operand
/// expressions `args` (simple names, so an expression may repeat them).
fn elementwise_expr(
    op: &Op,
    dtype: DType,
    args: &[String],
    libs: &mut BTreeSet<Lib>,
) -> Result<String> {
    Ok(match op {
        Op::Unary(u) => (u.def().wgsl)(&args[0], libs),
        Op::Binary(b) => (b.def().wgsl)(&args[0], &args[1], dtype == DType::I64, libs),
        Op::Cast { to } => {
            let x = &args[0];
            match to {
                DType::F32 => x.clone(),
                DType::I64 => format!("trunc({x})"),
                DType::Bool => truth(format!("{x} != 0.0")),
            }
        }
        Op::Where => format!("select({}, {}, {} != 0.0)", args[2], args[1], args[0]),
        Op::UnaryGrad(u) => (u.def().wgsl_grad)(&args[0], &args[1], libs),
        // The broadcast is in the operand's load; the value passes through.
        Op::Expand { .. } => args[0].clone(),
        other => {
            return Err(Error::gpu(format!(
                "{} is not element-wise (emitter bug)",
                other.name()
            )))
        }
    })
}

/// The op's name in summaries and comments: [`Op::name`], with the function of a `UnaryGrad`
/// spelt out (`sigmoid_grad`).
fn op_title(op: &Op) -> String {
    match op {
        Op::UnaryGrad(u) => format!("{}_grad", u.name()),
        op => op.name().to_string(),
    }
}

/// A statement's trailing comment naming the node it computes.
fn node_comment(graph: &Graph, n: NodeId) -> String {
    let node = graph.node(n);
    wgsl::comment_safe(&format!("// {} '{}'", op_title(&node.op), node.label))
}

/// Statements computing `nodes[from..]` at flat index `i`: node k's value in `{var}{k}`, from
/// earlier nodes' values in registers and its other operands loaded (`{load}{k}_{slot}`,
/// broadcast to its own shape); `store` runs after each node (to write the values something
/// outside needs). Every node must be element-wise (or a view passing its value on) and keep
/// the element count of `nodes[0]`: views keep the flat order, and an element-wise op of the
/// same element count reads an operand computed here at the same flat index (broadcasting to
/// as many elements is the identity), so `i` indexes every node.
fn elementwise_steps(
    b: &mut Builder,
    nodes: &[NodeId],
    from: usize,
    (var, load): (&str, &str),
    indent: &str,
    mut store: impl FnMut(&mut Builder, &mut Vec<String>, usize),
) -> Result<Vec<String>> {
    let graph = b.graph;
    let first_shape = graph.shape(nodes[0]).to_vec();
    let mut lines = vec![];
    for k in from..nodes.len() {
        let n = nodes[k];
        let node = graph.node(n);
        if !(is_elementwise(&node.op) || node.op.is_view())
            || numel(&node.shape) != numel(&first_shape)
        {
            return Err(Error::gpu(format!(
                "node '{}' ({} {}) cannot follow a {} value in its kernel: it must be \
                 element-wise and keep the element count",
                node.label,
                node.op.name(),
                shape_str(&node.shape),
                shape_str(&first_shape)
            )));
        }
        let mut args = vec![];
        for (slot, &i) in graph.inputs_of(n).iter().enumerate() {
            if let Some(j) = nodes[..k].iter().position(|&g| g == i) {
                args.push(format!("{var}{j}"));
                continue;
            }
            if nodes[k..].contains(&i) {
                return Err(Error::gpu(format!(
                    "node '{}' reads a value its kernel computes after it",
                    node.label
                )));
            }
            let (line, value) = b.load(&format!("{load}{k}_{slot}"), i, &node.shape, indent);
            lines.push(line);
            args.push(value);
        }
        // A view (StopGradient, say) passes its value through.
        let expr = if node.op.is_view() {
            args[0].clone()
        } else {
            elementwise_expr(&node.op, node.dtype, &args, &mut b.libs)?
        };
        lines.push(format!(
            "{indent}let {var}{k} = {expr}; {}",
            node_comment(graph, n)
        ));
        store(b, &mut lines, k);
    }
    Ok(lines)
}

/// Emits the epilogue of `group` (nodes `from`..) as statements over flat output index `i`,
/// starting from the value of node `from - 1` in `v{from - 1}` (the anchor's, `v0`, but for a
/// sum of products); returns the statements and the final value's name. Each node
/// reads the values of earlier group nodes from registers (`v{k}`) and loads the rest. A value
/// in `escapes` (read outside the group) is also stored, into a binding `y{k}` of its own.
fn epilogue(
    b: &mut Builder,
    group: &[NodeId],
    from: usize,
    indent: &str,
    escapes: &BTreeSet<NodeId>,
) -> Result<(Vec<String>, String)> {
    let mut lines = vec![];
    let last = group.len() - 1;
    let store = |b: &mut Builder, lines: &mut Vec<String>, k: usize| {
        if k < last && escapes.contains(&group[k]) {
            let name = format!("{}y{k}", b.scope);
            lines.push(format!(
                "{indent}{name}[i] = v{k}; // also read outside the kernel"
            ));
            b.writes.push((name, group[k]));
        }
    };
    store(b, &mut lines, from - 1);
    let steps = elementwise_steps(b, group, from, ("v", "e"), indent, store)?;
    lines.extend(steps);
    Ok((lines, format!("v{last}")))
}

fn elementwise(graph: &Graph, group: &[NodeId], name: &str, d: &Decisions) -> Result<Emitted> {
    let (transposed, max_wg, target) = (d.transposed, d.max_workgroups, d.target);
    let anchor = group[0];
    let node = graph.node(anchor);
    let out_shape = node.shape.clone();
    let n = numel(&out_shape);
    let ins = graph.inputs_of(anchor);
    let mut b = Builder::new(graph, transposed);
    // Scalars are loaded once, before the loop over an invocation's elements: in the loop, each
    // load would follow the stores of the elements before it and be made again.
    b.column_loads = Some(ColumnLoads {
        n: 0,
        read: ColumnRead::Scalars,
        loads: vec![],
    });
    let mut lines = vec![];
    let indent = "            ";
    let summary;
    match &node.op {
        Op::Transpose { perm } => {
            let x = b.bind("x", ins[0]);
            let in_shape = graph.shape(ins[0]);
            let in_strides = strides(in_shape);
            let muls: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
            summary = format!(
                "transpose {} by {perm:?} -> {}",
                shape_str(in_shape),
                shape_str(&out_shape)
            );
            lines.push(format!(
                "{indent}let v0 = {x}[{}]; {}",
                strided_index("i", &out_shape, &muls),
                node_comment(graph, anchor)
            ));
        }
        op if is_index_map(op) => {
            summary = index_map(&mut b, anchor, &mut lines, indent, d.stored)?;
        }
        op => {
            let names: &[&str] = match (op, ins.len()) {
                (Op::UnaryGrad(_), _) => &["x", "dy"],
                (Op::Where, _) => &["cond", "a", "b"],
                (_, 1) => &["x"],
                _ => &["a", "b"],
            };
            let mut args = vec![];
            for (&input, &bname) in ins.iter().zip(names) {
                let (line, value) = b.load(bname, input, &out_shape, indent);
                lines.push(line);
                args.push(value);
            }
            let expr = elementwise_expr(op, node.dtype, &args, &mut b.libs)?;
            lines.push(format!(
                "{indent}let v0 = {expr}; {}",
                node_comment(graph, anchor)
            ));
            let operands: Vec<String> = ins.iter().map(|&i| shape_str(graph.shape(i))).collect();
            summary = format!(
                "{} of {} -> {}",
                op_title(op),
                operands.join(" and "),
                shape_str(&out_shape)
            );
        }
    }
    let (more, last) = epilogue(&mut b, group, 1, indent, d.escapes)?;
    lines.extend(more);
    lines.push(format!("{indent}y[i] = {last};"));
    let scalars: String = (b.column_loads.take().into_iter())
        .flat_map(|c| c.loads)
        .map(|l| format!("\n    let {} = {};", l.name, l.at("0u")))
        .collect();
    let summary = with_epilogue(graph, summary, group);
    // Elements per invocation: on a CPU driver a workgroup's setup costs about as much as a
    // few thousand simple elements (lavapipe: a 128 x 512 ReLU took 0.5 ms in 256 workgroups).
    // No more than one workgroup needs, though: lavapipe compiles the loop's body once per
    // element of an invocation, and a first dispatch waits for that (an AdamW update of a
    // 512-vector, 14 bindings: 1.0 s at 16 elements an invocation, 0.07 s at 1).
    let per = match target {
        Target::Gpu => 1,
        Target::Cpu => ELEMENTWISE_PER_CPU.min(n.div_ceil(ELEMENTWISE_WG)).max(1),
    };
    let workgroups = wgsl::grid(n.div_ceil(ELEMENTWISE_WG * per), max_wg, name)?;
    b.finish(
        template::ELEMENTWISE,
        name,
        *group.last().unwrap(),
        vec![
            ("N", n.to_string()),
            ("GRID_X", workgroups[0].to_string()),
            ("GRID_Y", workgroups[1].to_string()),
            ("PER", per.to_string()),
            ("SCALARS", scalars),
            ("BODY", lines.join("\n")),
        ],
        workgroups,
        summary,
    )
}

/// The loads of an index-mapping anchor (Slice, Concat, the gathers, Trilu): statements over
/// flat output index `i` that end with its value in `v0`. Returns the kernel summary.
fn index_map(
    b: &mut Builder,
    n: NodeId,
    lines: &mut Vec<String>,
    indent: &str,
    stored: &BTreeMap<NodeId, Stored>,
) -> Result<String> {
    let graph = b.graph;
    let node = graph.node(n);
    let out = node.shape.clone();
    let ins = graph.inputs_of(n);
    let comment = node_comment(graph, n);
    let x_shape = graph.shape(ins[0]).to_vec();
    let x_strides = strides(&x_shape);
    let u = wgsl::u32_lit;
    let mut push = |line: String| lines.push(format!("{indent}{line}"));
    if numel(&out) == 0 {
        // No invocation runs; the shader only has to be valid.
        push(format!("let v0 = 0.0; {comment} (empty output)"));
        return Ok(format!("{} -> {} (empty)", node.op.name(), shape_str(&out)));
    }
    Ok(match &node.op {
        Op::Slice { starts, steps, .. } => {
            // base + sum(j_d * step_d * stride_d): the terms of negative steps are subtracted,
            // after the positive ones, so the u32 arithmetic never goes below zero.
            let x = b.bind("x", ins[0]);
            let empty = numel(&out) == 0;
            let base: i64 = (0..out.len())
                .map(|d| {
                    if empty {
                        0
                    } else {
                        starts[d] * x_strides[d] as i64
                    }
                })
                .sum();
            let muls = |sign: i64| -> Vec<usize> {
                (0..out.len())
                    .map(|d| {
                        let m = steps[d] * sign * x_strides[d] as i64;
                        if m > 0 {
                            m as usize
                        } else {
                            0
                        }
                    })
                    .collect()
            };
            let (pos, neg) = (
                strided_index("i", &out, &muls(1)),
                strided_index("i", &out, &muls(-1)),
            );
            let mut at = u(base as usize);
            if pos != "0u" {
                at = if base == 0 {
                    pos
                } else {
                    format!("{at} + {pos}")
                };
            }
            if neg != "0u" {
                at = format!("{at} - ({neg})");
            }
            push(format!("let v0 = {x}[{at}]; {comment}"));
            format!(
                "slice of {} from {starts:?} by {steps:?} -> {}",
                shape_str(&x_shape),
                shape_str(&out)
            )
        }
        Op::Concat { axis } => {
            let axis = *axis;
            let inner = numel(&out[axis + 1..]);
            push(format!(
                "let c = {}; // position along the joined axis {axis}",
                strided_index("i", &out, &unit_mul(out.len(), axis))
            ));
            push("var v0: f32;".into());
            let mut offset = 0;
            let mut branches = vec![];
            let mut parts = vec![];
            for (k, &input) in ins.iter().enumerate() {
                let shape = graph.shape(input);
                let len = shape[axis];
                parts.push(shape_str(shape));
                if len == 0 {
                    continue;
                }
                let x = b.bind(&format!("x{k}"), input);
                // The input's own layout: outer dims as the output's, `len` along the axis.
                let mut muls = strides(shape);
                muls[axis] = 0;
                let rest = strided_index("i", &out, &muls);
                let along = match (offset, inner) {
                    (0, 1) => "c".to_string(),
                    (0, _) => format!("c * {}", u(inner)),
                    (o, 1) => format!("(c - {})", u(o)),
                    (o, _) => format!("(c - {}) * {}", u(o), u(inner)),
                };
                let load = if rest == "0u" {
                    format!("v0 = {x}[{along}];")
                } else {
                    format!("v0 = {x}[{rest} + {along}];")
                };
                offset += len;
                branches.push((offset, load));
            }
            let last = branches.len().saturating_sub(1);
            for (j, (end, load)) in branches.iter().enumerate() {
                let head = match (j, j == last) {
                    (0, true) => "{".to_string(),
                    (0, false) => format!("if c < {} {{", u(*end)),
                    (_, true) => "} else {".to_string(),
                    _ => format!("}} else if c < {} {{", u(*end)),
                };
                push(head);
                push(format!("    {load}"));
            }
            if !branches.is_empty() {
                push(format!("}} {comment}"));
            }
            format!(
                "concat of {} along axis {axis} -> {}",
                parts.join(", "),
                shape_str(&out)
            )
        }
        Op::Gather { axis } => {
            let axis = *axis;
            let idx_shape = graph.shape(ins[1]).to_vec();
            let (dim, inner) = (x_shape[axis], numel(&x_shape[axis + 1..]));
            let summary = format!(
                "gather of {} at ids {} along axis {axis} -> {}",
                shape_str(&x_shape),
                shape_str(&idx_shape),
                shape_str(&out)
            );
            if dim == 0 {
                push(format!("let v0 = 0.0; {comment} (nothing to gather from)"));
                return Ok(summary);
            }
            // An embedding table may be stored in half precision or as codes (`storage`).
            let (x, x_stored) = b.bind_stored("data", ins[0], stored);
            let ids = b.bind("ids", ins[1]);
            b.libs.insert(Lib::GatherPosition);
            // Output dims: outer (data's before axis), the ids', inner (data's after axis).
            let view = [numel(&x_shape[..axis]), numel(&idx_shape), inner];
            let id_at = strided_index("i", &view, &[0, 1, 0]);
            let base = strided_index("i", &view, &[dim * inner, 0, 1]);
            push(format!(
                "let p = gather_position({ids}[{id_at}], {});",
                u(dim)
            ));
            let at = offset_expr(&base, "u32(max(p, 0))", inner);
            push(format!(
                "let v0 = select(0.0, {}, p >= 0); {comment}",
                storage::stored_load(&x, &at, x_stored)
            ));
            summary
        }
        Op::GatherElements { axis } => {
            let axis = *axis;
            let dim = x_shape[axis];
            let summary = format!(
                "gather_elements of {} along axis {axis} -> {}",
                shape_str(&x_shape),
                shape_str(&out)
            );
            if dim == 0 {
                push(format!("let v0 = 0.0; {comment} (nothing to gather from)"));
                return Ok(summary);
            }
            let x = b.bind("data", ins[0]);
            let ids = b.bind("ids", ins[1]);
            b.libs.insert(Lib::GatherPosition);
            let mut muls = x_strides.clone();
            muls[axis] = 0;
            let base = strided_index("i", &out, &muls);
            push(format!("let p = gather_position({ids}[i], {});", u(dim)));
            let at = offset_expr(&base, "u32(max(p, 0))", x_strides[axis]);
            push(format!(
                "let v0 = select(0.0, {x}[{at}], p >= 0); {comment}"
            ));
            summary
        }
        Op::GatherND { batch_dims } => {
            let bd = *batch_dims;
            let idx_shape = graph.shape(ins[1]).to_vec();
            let q = idx_shape.len();
            let k = idx_shape[q - 1];
            let inner = numel(&x_shape[bd + k..]);
            let summary = format!(
                "gather_nd of {} at ids {} (batch_dims {bd}) -> {}",
                shape_str(&x_shape),
                shape_str(&idx_shape),
                shape_str(&out)
            );
            if numel(&x_shape) == 0 {
                push(format!("let v0 = 0.0; {comment} (nothing to gather from)"));
                return Ok(summary);
            }
            let x = b.bind("data", ins[0]);
            let ids = b.bind("ids", ins[1]);
            b.libs.insert(Lib::GatherPosition);
            // Output dims: batch, tuples per batch entry, inner (data's dims after the indexed).
            let view = [numel(&idx_shape[..bd]), numel(&idx_shape[bd..q - 1]), inner];
            let m = strided_index("i", &view, &[view[1], 1, 0]);
            push(format!("let m = {m}; // the index tuple"));
            let mut at = strided_index("i", &view, &[numel(&x_shape[bd..]), 0, 1]);
            let mut ok = vec![];
            for t in 0..k {
                let id_at = match (k, t) {
                    (1, _) => "m".to_string(),
                    (_, 0) => format!("m * {}", u(k)),
                    _ => format!("m * {} + {}", u(k), u(t)),
                };
                push(format!(
                    "let p{t} = gather_position({ids}[{id_at}], {});",
                    u(x_shape[bd + t])
                ));
                at = offset_expr(&at, &format!("u32(max(p{t}, 0))"), x_strides[bd + t]);
                ok.push(format!("p{t} >= 0"));
            }
            push(format!(
                "let v0 = select(0.0, {x}[{at}], {}); {comment}",
                ok.join(" && ")
            ));
            summary
        }
        &Op::Trilu { upper, k } => {
            let x = b.bind("x", ins[0]);
            let r = out.len();
            let row = strided_index("i", &out, &unit_mul(r, r - 2));
            let col = strided_index("i", &out, &unit_mul(r, r - 1));
            push(format!("let d = i32({col}) - i32({row}); // column - row"));
            let keep = format!("d {} {k}", if upper { ">=" } else { "<=" });
            push(format!("let v0 = select(0.0, {x}[i], {keep}); {comment}"));
            format!(
                "trilu ({} triangle, k {k}) of {}",
                if upper { "upper" } else { "lower" },
                shape_str(&out)
            )
        }
        other => {
            return Err(Error::gpu(format!(
                "{} is not an index-mapping op (emitter bug)",
                other.name()
            )))
        }
    })
}

/// Multipliers that pick out the coordinate along `axis` of a rank-`rank` index space.
fn unit_mul(rank: usize, axis: usize) -> Vec<usize> {
    (0..rank).map(|d| usize::from(d == axis)).collect()
}

/// `base + term * mul`, written short.
fn offset_expr(base: &str, term: &str, mul: usize) -> String {
    let t = if mul == 1 {
        term.to_string()
    } else {
        format!("{term} * {}", wgsl::u32_lit(mul))
    };
    if base == "0u" {
        t
    } else {
        format!("{base} + {t}")
    }
}

/// The summary of a group: the anchor's, then the epilogue ops.
fn with_epilogue(graph: &Graph, summary: String, group: &[NodeId]) -> String {
    if group.len() == 1 {
        return summary;
    }
    let ops: Vec<String> = group[1..]
        .iter()
        .map(|&n| op_title(&graph.node(n).op))
        .collect();
    format!("{summary}, then {}", ops.join(", "))
}

/// MatMul and Gemm: the 16x16 template (one output per invocation), or the register-blocked
/// one (a 4x4 block per invocation, 64x64 per workgroup) for outputs of at least
/// [`BLOCKED_MIN`] rows and columns. Both run the same epilogue on each output element.
fn matmul(graph: &Graph, group: &[NodeId], name: &str, d: &Decisions) -> Result<Emitted> {
    let (max_wg, target) = (d.max_workgroups, d.target);
    let anchor = group[0];
    let node = graph.node(anchor);
    let ins = graph.inputs_of(anchor);
    // A group summing two products (`product_sums`): the second's terms join the same sums.
    let second = match product_sums::layout(graph, group) {
        None => None,
        Some(Ok(second)) => Some(second),
        Some(Err(why)) => return Err(Error::gpu(format!("kernel {name}: {why} (fusion bug)"))),
    };
    let mut b = Builder::new(graph, d.transposed);
    let first_operands = bind_operands(&mut b, anchor, "", d);
    // `first`: the statement that turns the dot product `acc` into `v0` (indented below).
    let dims = product_dims(graph, anchor, &first_operands, "", d.pitch)?;
    let (m, k, n, batch) = (dims.m, dims.k, dims.n, dims.batch);
    let shape = MatmulShape::choose(target, m, n, d.subgroup_size);
    // On the columns template, whose lanes own whole columns of a tile, the epilogue's loads that
    // depend on the column alone (a bias, DoRA's magnitude scale, LoRA's scale) are made once per
    // column of a lane before the loop over the tile (`{{E_COLUMNS}}`, [`lane_columns`]), not
    // once per element, where each would follow the stores of the elements before it and be
    // made again. On lavapipe, LoRA's backward `dY W0` kernel with its scale in the epilogue
    // went from 3.5-4.5 to 2.9 ms; a 256 x 512 x 512 DoRA layer from 8.5 to 7.9 ms.
    if matches!(shape, MatmulShape::Columns { .. }) {
        b.column_loads = Some(ColumnLoads {
            n,
            read: ColumnRead::Lanes,
            loads: vec![],
        });
    }
    let (first, summary);
    match &node.op {
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let mut value = match *alpha {
                1.0 => "acc".to_string(),
                al => format!("{} * acc", wgsl::f32_lit(al)?),
            };
            let mut c_note = String::new();
            if let Some(&c_node) = ins.get(2) {
                let c = b.bind("c", c_node);
                let c_shape = graph.shape(c_node);
                let load = match b.column_load("c", &c, c_shape, None) {
                    Some(read) => read,
                    None => format!("{c}[{}]", broadcast_index("i", c_shape, &[m, n])),
                };
                value += &match *beta {
                    1.0 => format!(" + {load}"),
                    be => format!(" + {} * {load}", wgsl::f32_lit(be)?),
                };
                c_note = format!(", C {}", shape_str(c_shape));
            }
            first = format!("let v0 = {value}; {}", node_comment(graph, anchor));
            let t = |on: bool, s: &str| if on { s.to_string() } else { String::new() };
            summary = format!(
                "gemm alpha={alpha} beta={beta}{}{}: A {}, B {}{c_note} -> {}",
                t(*trans_a, " transA"),
                t(*trans_b, " transB"),
                shape_str(graph.shape(ins[0])),
                shape_str(graph.shape(ins[1])),
                shape_str(&node.shape)
            );
        }
        _ => {
            first = format!("let v0 = acc; {}", node_comment(graph, anchor));
            summary = format!(
                "matmul {} @ {} -> {}",
                shape_str(graph.shape(ins[0])),
                shape_str(graph.shape(ins[1])),
                shape_str(&node.shape)
            );
        }
    }
    // Held while the operands' helpers gather loads of their own, until the epilogue's turn.
    let first_columns = b.column_loads.take();
    let mut summary = summary + &first_operands.notes(graph);
    // With subgroups that the workgroup fills, each lane of the columns template loads one of
    // every SG values of A a row needs and the lanes hand them round by shuffles: a gather per
    // row and block instead of SG loads of one address by all lanes, which a CPU driver makes
    // dear (lavapipe, 128 x 512 @ 512 x 512: 3.4 against 4.0 ms, 4.85 against 5.1 with B
    // transposed).
    let shuffles = match shape {
        MatmulShape::Columns { lanes, .. } => {
            (d.subgroup_size).filter(|&sg| sg > 1 && lanes % sg as usize == 0)
        }
        _ => None,
    };
    // The columns template loads the prologue values that depend on an operand's column alone
    // once per column: B's before its K loop, A's once per block of K (with shuffles).
    let hoist = [
        shuffles.is_some(),
        matches!(shape, MatmulShape::Columns { .. }),
    ];
    // The columns template loads a lane's four columns of B at once where they are contiguous
    // (lavapipe, 256 x 512 @ 512 x 512: 8.1 -> 6.2 ms): a load per lane costs a bounds check,
    // a mask test and an insert, whatever its width.
    let quads = |operands: &Operands, dims: &ProductDims| {
        matches!(shape, MatmulShape::Columns { .. })
            && dims.b_quads
            && operands.b.prologue.is_none()
            && operands.b.stored.is_none()
    };
    let mut b_quads = vec![quads(&first_operands, &dims)];
    let mut column_loads = vec![operand_helpers(
        &mut b,
        &first_operands,
        &dims,
        "",
        None,
        hoist,
        b_quads[0],
    )?];
    let mut suffixes = vec![""];
    // Each product's K, for the K loop's instances.
    let mut ks = vec![k];
    if let Some(second) = second {
        // The second product's operands, index and load helpers (`a2_get`, ...) and K2.
        let p2 = second.product;
        let operands = bind_operands(&mut b, p2, "2", d);
        let dims2 = product_dims(graph, p2, &operands, "2", d.pitch)?;
        let scale = second
            .scale
            .map(|s| (b.bind("s2", s), graph.node(s).label.clone()));
        let title = product_title(graph, p2) + &operands.notes(graph);
        b.helpers.push(format!(
            "// The second product, {title}.\n\
             // Its K2 terms join the same sums after the first product's K: the kernel computes\n\
             // the sum of the two products.\n\
             const K2: u32 = {}u;",
            dims2.k
        ));
        ks.push(dims2.k);
        b_quads.push(quads(&operands, &dims2));
        column_loads.push(operand_helpers(
            &mut b,
            &operands,
            &dims2,
            "2",
            scale.as_ref(),
            hoist,
            b_quads[1],
        )?);
        suffixes.push("2");
        summary += &format!(" + {title}");
        if let Some((_, label)) = &scale {
            summary += &format!(" times {label}");
        }
    }
    let (template, indent) = match shape {
        MatmulShape::Tiled => (template::MATMUL, "        "),
        MatmulShape::Blocked { .. } => (MATMUL_BLOCKED, "                "),
        MatmulShape::Columns { .. } => (MATMUL_COLUMNS, "                    "),
    };
    let mut lines = vec![format!("{indent}{first}")];
    // The nodes up to the add of two summed products have no values of their own: the add's is
    // `acc`'s.
    let from = match second {
        Some(second) => {
            let add = group[second.add];
            lines.push(format!(
                "{indent}let v{} = v0; {}",
                second.add,
                node_comment(graph, add)
            ));
            second.add + 1
        }
        None => 1,
    };
    b.column_loads = first_columns;
    let (more, last) = epilogue(&mut b, group, from, indent, d.escapes)?;
    lines.extend(more);
    lines.push(format!("{indent}y[i] = {last};"));
    let (tile_m, tile_n) = shape.tile();
    let (tiles_m, tiles_n) = (m.div_ceil(tile_m), n.div_ceil(tile_n));
    let sum_rows = row_tiles(graph, anchor, target, d.subgroup_size).unwrap_or(0);
    let sums = column_sums(&mut b, group, d, shape, sum_rows, indent, &mut lines)?;
    let e_columns = b
        .column_loads
        .take()
        .map_or(String::new(), |c| lane_columns(&c.loads));
    let workgroups = wgsl::grid(batch * tiles_m * tiles_n, max_wg, name)?;
    // A sum's summary names its second product already: the epilogue starts at the add.
    let shown = match second {
        Some(second) => &group[second.add - 1..],
        None => group,
    };
    let mut summary = with_epilogue(graph, summary, shown);
    if !sums.names.is_empty() {
        let names = sums.names.join(", ");
        summary = format!("{summary}; beside, {names} summed per tile of rows ({sum_rows}x{n})");
    }
    let mut params = vec![
        ("M", m.to_string()),
        ("K", k.to_string()),
        ("N", n.to_string()),
        ("BATCH", batch.to_string()),
        // At least 1: the kernel divides by them, even when an empty output gives it no
        // workgroups to run.
        ("TILES_M", tiles_m.max(1).to_string()),
        ("TILES_N", tiles_n.max(1).to_string()),
        ("GRID_X", workgroups[0].to_string()),
        ("GRID_Y", workgroups[1].to_string()),
        ("EPILOGUE", lines.join("\n")),
    ];
    // The K loop's instances, one per product summed.
    let mut segments: Vec<template::Instance> = (suffixes.iter())
        .map(|s| vec![("S", s.to_string())])
        .collect();
    match shape {
        MatmulShape::Tiled => {}
        MatmulShape::Blocked { tile_m, tile_n, vb } => params.extend([
            ("TILE_M", tile_m.to_string()),
            ("TILE_N", tile_n.to_string()),
            ("WG_X", (tile_n / (4 * vb)).to_string()),
            ("WG_Y", (tile_m / (4 * vb)).to_string()),
            ("VB", vb.to_string()),
            ("PARTS", sums.declarations()),
            ("PARTS_STORE_LOOP", sums.store_loop()),
        ]),
        MatmulShape::Columns { rows, vecs, lanes } => {
            let (step, lane) = match shuffles {
                Some(sg) => (sg, ",\n    @builtin(subgroup_invocation_id) lane: u32"),
                None => (1, ""),
            };
            // B's column-only prologue values, per column of this lane, made before the loops.
            let mut setup = String::new();
            for (suffix, &[_, hoisted]) in suffixes.iter().zip(&column_loads) {
                if hoisted == Hoisted::PerColumn {
                    setup += &format!(
                        "\n    // The values B{suffix}'s prologue loads per column, once.\n    \
                         var bcol{suffix}: array<array<B{suffix}Column, 4>, VECS>;\n    \
                         for (var ci = 0u; ci < VECS; ci = ci + 1u) {{\n        \
                         let j = cols[ci];\n        \
                         bcol{suffix}[ci] = array<B{suffix}Column, 4>(b{suffix}_column(j.x), \
                         b{suffix}_column(j.y), b{suffix}_column(j.z), b{suffix}_column(j.w));\n    }}"
                    );
                }
            }
            params.push(("B_COLUMNS", setup));
            let zipped = (segments.iter_mut().zip(suffixes.iter().zip(&ks)))
                .zip(column_loads.iter().zip(&b_quads));
            for ((values, (suffix, &k_s)), (&[a_hoisted, b_hoisted], &quads)) in zipped {
                let steps = block_steps(k_s, step as usize, "STEP", &format!("K{suffix}"), "p0");
                values.push(("STEPS", steps));
                // A lane's four columns of B at step p: one load, or four.
                let b_value = match quads {
                    true => format!("b{suffix}_get4(batch, p, j.x)"),
                    false => {
                        let loads: Vec<String> = (["x", "y", "z", "w"].iter().enumerate())
                            .map(|(e, c)| {
                                let arg = match b_hoisted {
                                    Hoisted::PerColumn => format!(", bcol{suffix}[ci][{e}]"),
                                    Hoisted::PerStep => format!(", bstep{suffix}"),
                                    Hoisted::No => String::new(),
                                };
                                format!(
                                    "                    b{suffix}_get(batch, p, j.{c}{arg}),\n"
                                )
                            })
                            .collect();
                        format!("vec4<f32>(\n{}                )", loads.concat())
                    }
                };
                values.push(("B_VALUE", b_value));
                let b_step = match b_hoisted {
                    Hoisted::PerStep => format!(
                        "\n            // The values B{suffix}'s prologue loads per step, once.\n            \
                         let bstep{suffix} = b{suffix}_column(p);"
                    ),
                    _ => String::new(),
                };
                values.push(("B_STEP", b_step));
                let (a_block, a_value) = match shuffles {
                    Some(_) => {
                        let (column, arg) = if a_hoisted == Hoisted::No {
                            (String::new(), "")
                        } else {
                            (format!("let acol = a{suffix}_column(pl);"), ", acol")
                        };
                        let block = [
                            "// This lane's values of A for the block, A[rows[ri], p0 + lane]",
                            "// (clamped), shuffled to the others below.",
                            "var amine: array<f32, ROWS>;",
                            &format!("let pl = min(p0 + lane, K{suffix} - 1u);"),
                            &column,
                            "for (var ri = 0u; ri < ROWS; ri = ri + 1u) {",
                            &format!("    amine[ri] = a{suffix}_get(batch, rows[ri], pl{arg});"),
                            "}",
                        ];
                        let block: Vec<String> = (block.iter())
                            .filter(|l| !l.is_empty())
                            .map(|l| format!("        {l}"))
                            .collect();
                        (
                            block.join("\n"),
                            "subgroupShuffle(amine[ri], pe)".to_string(),
                        )
                    }
                    None => (String::new(), format!("a{suffix}_get(batch, rows[ri], p)")),
                };
                values.extend([("A_BLOCK", a_block), ("A_VALUE", a_value)]);
            }
            let macs = batch * m * n * ks.iter().sum::<usize>();
            params.extend([
                ("BOUND", loop_bound(macs).to_string()),
                ("STEP", step.to_string()),
                ("LANE", lane.to_string()),
                ("ROWS", rows.to_string()),
                ("VECS", vecs.to_string()),
                ("LANES", lanes.to_string()),
                ("PARTS", sums.declarations()),
                ("PARTS_STORE_LOOP", sums.store_loop()),
                ("E_COLUMNS", e_columns),
            ]);
        }
    }
    b.sections.push(("SEGMENTS", segments));
    b.finish(
        template,
        name,
        *group.last().unwrap(),
        params,
        workgroups,
        summary,
    )
}

/// A product's operand as its kernel reads it.
struct Operand {
    /// The value bound: the operand, or the source of a transpose read in place.
    src: NodeId,
    /// The transpose's permutation, where the operand is one read in place.
    perm: Option<Vec<usize>>,
    /// The bound value's storage, where it is a constant stored other than as f32.
    stored: Option<Stored>,
    /// The element-wise chain that computes the operand as it is loaded (an operand prologue),
    /// which binds its own operands instead.
    prologue: Option<Vec<NodeId>>,
}

/// A product's A and B operands.
struct Operands {
    a: Operand,
    b: Operand,
}

impl Operands {
    /// What the kernel summary says of the operands: transposes read in place, prologues.
    fn notes(&self, graph: &Graph) -> String {
        let mut notes = match (&self.a.perm, &self.b.perm) {
            (None, None) => String::new(),
            (Some(_), None) => " (A: a transpose read in place)".to_string(),
            (None, Some(_)) => " (B: a transpose read in place)".to_string(),
            (Some(_), Some(_)) => " (A and B: transposes read in place)".to_string(),
        };
        for (name, operand) in [("A", &self.a), ("B", &self.b)] {
            if let Some(chain) = &operand.prologue {
                let ops: Vec<String> = chain.iter().map(|&n| op_title(&graph.node(n).op)).collect();
                notes += &format!(" ({name} computed as it is loaded: {})", ops.join(", "));
            }
        }
        notes
    }
}

/// Binds the operands of `product` as `a{suffix}` and `b{suffix}` (a transpose read in place
/// binds its source; an operand prologue binds nothing here).
fn bind_operands(b: &mut Builder, product: NodeId, suffix: &str, d: &Decisions) -> Operands {
    let ins = b.graph.inputs_of(product);
    let (a_src, a_perm) = b.source(ins[0]);
    let (b_src, b_perm) = b.source(ins[1]);
    let mut operand = |name: &str, src: NodeId, perm: Option<&[usize]>| {
        let prologue = d.operand_prologues.get(&src).cloned();
        let stored = match prologue {
            None => b.bind_stored(&format!("{name}{suffix}"), src, d.stored).1,
            Some(_) => None,
        };
        Operand {
            src,
            perm: perm.map(<[usize]>::to_vec),
            stored,
            prologue,
        }
    };
    Operands {
        a: operand("a", a_src, a_perm),
        b: operand("b", b_src, b_perm),
    }
}

/// A product's dimensions and the offsets of its operands' elements.
struct ProductDims {
    m: usize,
    k: usize,
    n: usize,
    /// Output matrices.
    batch: usize,
    /// The offset in A's binding of A[i, p] of output matrix `batch`, and in B's of B[p, j].
    a_at: String,
    b_at: String,
    /// B[p, j..j + 3], for j a multiple of 4, is four contiguous values starting at a multiple
    /// of four: every row of B (of every output matrix) starts at one and N is one. The columns
    /// template then loads a lane's four columns at once (`b_get4`).
    b_quads: bool,
}

/// The dimensions of `product` and its operands' offsets, as WGSL over the kernel's constants
/// (`K{suffix}`: the second product of a sum has its own K).
fn product_dims(
    graph: &Graph,
    product: NodeId,
    operands: &Operands,
    suffix: &str,
    pitch: &BTreeMap<NodeId, usize>,
) -> Result<ProductDims> {
    let ins = graph.inputs_of(product);
    let (a_shape, b_shape) = (graph.shape(ins[0]), graph.shape(ins[1]));
    // `*_strides`: the element strides of each axis of the logical operand in the bound value's
    // memory, where that is not the operand's own contiguous layout.
    let a_strides = operand_strides(graph, operands.a.src, operands.a.perm.as_deref(), pitch);
    let b_strides = operand_strides(graph, operands.b.src, operands.b.perm.as_deref(), pitch);
    let k_name = format!("K{suffix}");
    if let Op::Gemm {
        trans_a, trans_b, ..
    } = &graph.node(product).op
    {
        let (m, k) = if *trans_a {
            (a_shape[1], a_shape[0])
        } else {
            (a_shape[0], a_shape[1])
        };
        let n = if *trans_b { b_shape[0] } else { b_shape[1] };
        // Gemm's A[i, p] is its operand's [i, p], or [p, i] with transA.
        let (ai, ap) = if *trans_a { (1, 0) } else { (0, 1) };
        let a_at = match &a_strides {
            None if *trans_a => "p * M + i".to_string(),
            None => format!("i * {k_name} + p"),
            Some(st) => index_sum(&[("i", st[ai]), ("p", st[ap])]),
        };
        let (bp, bj) = if *trans_b { (1, 0) } else { (0, 1) };
        let b_at = match &b_strides {
            None if *trans_b => format!("j * {k_name} + p"),
            None => "p * N + j".to_string(),
            Some(st) => index_sum(&[("p", st[bp]), ("j", st[bj])]),
        };
        let b_quads = n % 4 == 0
            && match &b_strides {
                None => !*trans_b,
                Some(st) => st[bj] == 1 && st[bp] % 4 == 0,
            };
        return Ok(ProductDims {
            m,
            k,
            n,
            batch: 1,
            a_at,
            b_at,
            b_quads,
        });
    }
    let d = matmul_dims(a_shape, b_shape).map_err(Error::shape)?;
    let (m, k, n) = (d.m, d.k, d.n);
    // The offset of output matrix `batch` in an operand whose batch dims `own` have element
    // strides `own_strides` (broadcast dims contribute nothing).
    let offset = |own: &[usize], own_strides: &[usize]| {
        let muls = broadcast_strides(own, own_strides, &d.batch);
        match strided_index("batch", &d.batch, &muls).as_str() {
            "0u" => String::new(),
            e => format!("{e} + "),
        }
    };
    // A contiguous operand's batch matrices are `size` elements apart.
    let contiguous = |own: &[usize], size: usize| -> Vec<usize> {
        strides(own).into_iter().map(|s| s * size).collect()
    };
    let a_at = match &a_strides {
        None => format!(
            "{}i * {k_name} + p",
            offset(&d.a_batch, &contiguous(&d.a_batch, m * k))
        ),
        Some(st) => {
            let r = st.len();
            let rest = index_sum(&[("i", st[r - 2]), ("p", st[r - 1])]);
            format!("{}{rest}", offset(&a_shape[..r - 2], &st[..r - 2]))
        }
    };
    let b_at = match &b_strides {
        None => format!(
            "{}p * N + j",
            offset(&d.b_batch, &contiguous(&d.b_batch, k * n))
        ),
        Some(st) => {
            let r = st.len();
            let rest = index_sum(&[("p", st[r - 2]), ("j", st[r - 1])]);
            format!("{}{rest}", offset(&b_shape[..r - 2], &st[..r - 2]))
        }
    };
    // Contiguous matrices are k * n values apart; strided ones need every stride but j's
    // (which must be 1) a multiple of four.
    let b_quads = n % 4 == 0
        && match &b_strides {
            None => true,
            Some(st) => st.last() == Some(&1) && st[..st.len() - 1].iter().all(|s| s % 4 == 0),
        };
    Ok(ProductDims {
        m,
        k,
        n,
        batch: numel(&d.batch),
        a_at,
        b_at,
        b_quads,
    })
}

/// "matmul 256x16 @ 16x512" or "gemm transB 256x16, 512x16": a product named in a summary.
fn product_title(graph: &Graph, product: NodeId) -> String {
    let ins = graph.inputs_of(product);
    let (a, b) = (
        shape_str(graph.shape(ins[0])),
        shape_str(graph.shape(ins[1])),
    );
    match &graph.node(product).op {
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            let t = |on: bool, s: &'static str| if on { s } else { "" };
            format!(
                "gemm{}{} {a}, {b}",
                t(*trans_a, " transA"),
                t(*trans_b, " transB")
            )
        }
        _ => format!("matmul {a} @ {b}"),
    }
}

/// Whether and where the columns template makes an operand prologue's column-only loads
/// ([`operand_helpers`]).
#[derive(Clone, Copy, PartialEq)]
enum Hoisted {
    No,
    /// Once per step of K: A's, and B's read through a transpose whose source's columns are K.
    PerStep,
    /// Once per column of a lane, before the K loop: B's.
    PerColumn,
}

/// True when B read through transpose `perm` has its K axis (the second-to-last) along the
/// source's last axis: the source's columns are steps of K.
fn columns_along_k(perm: &[usize]) -> bool {
    let rank = perm.len();
    rank >= 2 && perm[rank - 2] == rank - 1
}

/// Pushes the helpers that load a product's operands: `a{suffix}_at` and `b{suffix}_at` (the
/// offsets), `a{suffix}_get` and `b{suffix}_get` (the values: decoding a weight stored in half
/// precision, or computing an operand prologue), A's values multiplied by the scalar `scale`
/// (its binding, and its label) where there is one.
///
/// Where `hoist` says so for A and B (the columns template), the loads of a prologue that depend
/// on the operand value's column alone go into `a{suffix}_column(p)` / `b{suffix}_column(col)`,
/// whose values the `_get` helper takes as `c` (see [`ColumnLoads`]). B read through a transpose
/// whose source's columns run along K (`x Aᵀ` turned, reading `xᵀ`) takes `b{suffix}_column(p)`:
/// the values are the same for every column of a step. Returns where it did, and how.
fn operand_helpers(
    b: &mut Builder,
    operands: &Operands,
    dims: &ProductDims,
    suffix: &str,
    scale: Option<&(String, String)>,
    hoist: [bool; 2],
    quads: bool,
) -> Result<[Hoisted; 2]> {
    let mut hoisted = [Hoisted::No; 2];
    let (a_at, b_at) = (&dims.a_at, &dims.b_at);
    b.helpers.push(format!(
        "// Offset in `a{suffix}` of A{suffix}[i, p] of output matrix `batch`.\n\
         fn a{suffix}_at(batch: u32, i: u32, p: u32) -> u32 {{\n    return {a_at};\n}}"
    ));
    b.helpers.push(format!(
        "// Offset in `b{suffix}` of B{suffix}[p, j] of output matrix `batch`.\n\
         fn b{suffix}_at(batch: u32, p: u32, j: u32) -> u32 {{\n    return {b_at};\n}}"
    ));
    let operands = [
        ("a", &operands.a, ("i", "p"), scale),
        ("b", &operands.b, ("p", "j"), None),
    ];
    for (slot, (op, operand, (x, y), scale)) in operands.into_iter().enumerate() {
        let op = format!("{op}{suffix}");
        let scaled = |value: String| match scale {
            Some((binding, _)) => format!("{binding}[0] * {value}"),
            None => value,
        };
        let scale_note = match scale {
            Some((_, label)) => format!(", times {label}"),
            None => String::new(),
        };
        if let Some(chain) = &operand.prologue {
            // The chain's loads index its value by a flat `i`: the row is not called that.
            let (x, y) = if op.starts_with('a') {
                ("row", y)
            } else {
                (x, "col")
            };
            let indent = "    ";
            let mut lines = vec![format!("{indent}let i = {op}_at(batch, {x}, {y});")];
            let (var, load) = (format!("{op}v"), format!("{op}e"));
            let no_store = |_: &mut Builder, _: &mut Vec<String>, _: usize| {};
            let how = match &operand.perm {
                None if slot == 0 => Hoisted::PerStep,
                None => Hoisted::PerColumn,
                Some(perm) if slot == 1 && columns_along_k(perm) => Hoisted::PerStep,
                Some(_) => Hoisted::No,
            };
            if hoist[slot] && how != Hoisted::No {
                let n = *b.graph.shape(operand.src).last().unwrap_or(&1);
                b.column_loads = Some(ColumnLoads {
                    n,
                    read: ColumnRead::Helper,
                    loads: vec![],
                });
            }
            let steps = elementwise_steps(b, chain, 0, (&var, &load), indent, no_store);
            let columns = b.column_loads.take().map_or(vec![], |c| c.loads);
            lines.extend(steps?);
            let mut params = String::new();
            if !columns.is_empty() {
                let name = format!("{}Column", op.to_uppercase());
                let fields: Vec<String> = (columns.iter())
                    .map(|l| format!("    {}: f32,", l.name))
                    .collect();
                let (index, when) = match (slot, how) {
                    (0, _) => ("p", "per step of K, not once per row"),
                    (_, Hoisted::PerStep) => ("p", "per step of K, not once per column"),
                    _ => ("col", "per column, before the K loop"),
                };
                let loads: Vec<String> = columns.iter().map(|l| l.at(index)).collect();
                b.helpers.push(format!(
                    "// The values {}'s prologue loads that depend on the column alone: made once\n\
                     // {when}.\n\
                     struct {name} {{\n{}\n}}\n\n\
                     fn {op}_column({index}: u32) -> {name} {{\n    return {name}({});\n}}",
                    op.to_uppercase(),
                    fields.join("\n"),
                    loads.join(", ")
                ));
                params = format!(", c: {name}");
                hoisted[slot] = how;
            }
            b.helpers.push(format!(
                "// {}[{x}, {y}] of output matrix `batch`{scale_note}, computed as it is loaded (an operand\n\
                 // prologue): element i of the value the chain below computes.\n\
                 fn {op}_get(batch: u32, {x}: u32, {y}: u32{params}) -> f32 {{\n{}\n    return {};\n}}",
                op.to_uppercase(),
                lines.join("\n"),
                scaled(format!("{var}{}", chain.len() - 1))
            ));
            continue;
        }
        if quads && slot == 1 {
            // Bound as vec4s (`ProductDims::b_quads`): one load gives a lane its four columns.
            b.quads.insert(format!("{}{op}", b.scope));
            b.helpers.push(format!(
                "// B{suffix}[p, j..j + 3] of output matrix `batch`, j a multiple of 4: one load.\n\
                 fn {op}_get4(batch: u32, p: u32, j: u32) -> vec4<f32> {{\n    \
                 return {op}[{op}_at(batch, p, j) / 4u];\n}}"
            ));
            continue;
        }
        let note = match operand.stored {
            Some(h) => format!(", stored as {}", h.name()),
            None => String::new(),
        };
        let load = storage::stored_load(&op, &format!("{op}_at(batch, {x}, {y})"), operand.stored);
        b.helpers.push(format!(
            "// {}[{x}, {y}] of output matrix `batch`{note}{scale_note}.\n\
             fn {op}_get(batch: u32, {x}: u32, {y}: u32) -> f32 {{\n    return {};\n}}",
            op.to_uppercase(),
            scaled(load)
        ));
    }
    Ok(hoisted)
}

/// The declarations and stores of the terms that a product's kernel sums over each tile of
/// its rows (`fusion`'s column sums), whose statements it appends to `lines`, the epilogue of
/// output element `i`: each term from the group's values in registers (`v{k}`) and its other
/// operands loaded at `i`, added to this invocation's sum of its rows of the element's column
/// (`part{q}`), stored after the loop as its row of binding `ys{q}`, of `tiles` rows: one row
/// per tile on the columns template, whose invocations own whole columns of a tile; one per row
/// of invocations of a tile on the blocked template.
fn column_sums(
    b: &mut Builder,
    group: &[NodeId],
    d: &Decisions,
    shape: MatmulShape,
    tiles: usize,
    indent: &str,
    lines: &mut Vec<String>,
) -> Result<ColumnSumCode> {
    let graph = b.graph;
    let mut code = ColumnSumCode {
        shape,
        ..ColumnSumCode::default()
    };
    let terms: Vec<(&NodeId, &ColumnSum)> = (d.column_sums.iter())
        .filter(|(_, c)| c.product == group[0])
        .collect();
    if terms.iter().any(|(_, c)| c.tiles != tiles) {
        return Err(Error::gpu(format!(
            "'{}': column sums planned for another tiling (emitter bug)",
            graph.node(group[0]).label
        )));
    }
    let (part, ty, row) = match shape {
        MatmulShape::Columns { .. } => (
            "[ci][ei]",
            "array<vec4<f32>, VECS>",
            "batch * TILES_M + row0 / ROWS",
        ),
        MatmulShape::Blocked { .. } => (
            "[bj]",
            "array<f32, BLOCK>",
            "(batch * TILES_M + row0 / TILE_M) * WG_Y + lid.y",
        ),
        MatmulShape::Tiled => ("", "", ""),
    };
    for (q, (&t, sum)) in terms.into_iter().enumerate() {
        if part.is_empty() {
            return Err(Error::gpu(
                "the 16 x 16 matmul template sums no terms over its tiles (emitter bug)"
                    .to_string(),
            ));
        }
        let node = graph.node(t);
        let mut args = vec![];
        for (slot, &input) in graph.inputs_of(t).iter().enumerate() {
            let source = super::fusion::through_views(graph, input);
            match group.iter().position(|&g| g == source) {
                Some(k) => args.push(format!("v{k}")),
                None => {
                    let (line, value) = b.load(&format!("t{q}_{slot}"), input, &node.shape, indent);
                    lines.push(line);
                    args.push(value);
                }
            }
        }
        let expr = elementwise_expr(&node.op, node.dtype, &args, &mut b.libs)?;
        lines.push(format!(
            "{indent}part{q}{part} = part{q}{part} + ({expr}); {}",
            node_comment(graph, t)
        ));
        code.names.push(op_title(&node.op));
        let out = format!("ys{q}");
        b.writes.push((out.clone(), t));
        b.shapes.insert(t, sum.shape(&node.shape));
        code.decl.push(format!(
            "    // part{q}{part}: this invocation's sum over its rows of the column's {}\n    \
             var part{q}: {ty};",
            wgsl::comment_safe(&format!("'{}'", node.label))
        ));
        code.store
            .push(format!("{out}[({row}) * N + col] = part{q}{part};"));
    }
    Ok(code)
}

/// The bound of a loop over one block of `step` steps of a loop over `len`, whose block starts
/// at `start`: the constant `step_const` where every block is whole, a bound the compiler knows,
/// so that it unrolls the block and each shuffle reads a lane it knows; otherwise
/// `min(step_const, len_expr - start)`. The columns matmul's K loop and the DoRA norm's loop
/// over the input features take it (on lavapipe a 256 x 512 x 512 DoRA layer ran 8.1-8.6 ms
/// with the `min` bound, 7.4-8.1 with STEP).
fn block_steps(len: usize, step: usize, step_const: &str, len_expr: &str, start: &str) -> String {
    match len % step {
        0 => step_const.to_string(),
        _ => format!("min({step_const}, {len_expr} - {start})"),
    }
}

/// The columns template's loads of the values its epilogue reads per column ([`ColumnLoads`],
/// [`ColumnRead::Lanes`]), made before the loop over the tile's elements: a scalar once, a
/// vector as a vec4 per four columns of the lane, like its sums (`cols`, clamped into the
/// output). Lines of their own after the placeholder's; nothing when there are none.
fn lane_columns(loads: &[ColumnLoad]) -> String {
    if loads.is_empty() {
        return String::new();
    }
    let mut lines = vec![
        String::new(),
        "    // The epilogue's values that depend on the column alone, loaded once per column of"
            .to_string(),
        "    // this lane rather than once per element.".to_string(),
    ];
    let (scalars, vectors): (Vec<&ColumnLoad>, Vec<&ColumnLoad>) =
        loads.iter().partition(|l| l.scalar);
    for l in scalars {
        lines.push(format!("    let {} = {};", l.name, l.at("0u")));
    }
    if !vectors.is_empty() {
        for l in &vectors {
            lines.push(format!("    var {}: array<vec4<f32>, VECS>;", l.name));
        }
        lines.push("    for (var ci = 0u; ci < VECS; ci = ci + 1u) {".into());
        lines.push("        let j = cols[ci];".into());
        for l in &vectors {
            let four: Vec<String> = ["j.x", "j.y", "j.z", "j.w"].map(|c| l.at(c)).into();
            lines.push(format!(
                "        {}[ci] = vec4<f32>({});",
                l.name,
                four.join(", ")
            ));
        }
        lines.push("    }".into());
    }
    lines.join("\n")
}

/// What [`column_sums`] adds to a matmul template: declarations before the epilogue loop,
/// stores of each column's sum after it.
#[derive(Default)]
struct ColumnSumCode {
    shape: MatmulShape,
    decl: Vec<String>,
    store: Vec<String>,
    /// The terms' ops, for the kernel's summary.
    names: Vec<String>,
}

impl ColumnSumCode {
    /// The declarations, on lines of their own after the placeholder's (nothing when there
    /// are none).
    fn declarations(&self) -> String {
        self.decl.iter().map(|d| format!("\n{d}")).collect()
    }

    /// The loop storing this invocation's column sums, on lines of its own after the
    /// placeholder's (nothing when it has none).
    fn store_loop(&self) -> String {
        if self.store.is_empty() {
            return String::new();
        }
        let (loops, col): (&[&str], &str) = match self.shape {
            MatmulShape::Blocked { .. } => (
                &["for (var bj = 0u; bj < BLOCK; bj = bj + 1u) {"],
                "col0 + 4u * (lid.x + WG_X * (bj / 4u)) + bj % 4u",
            ),
            _ => (
                &[
                    "for (var ci = 0u; ci < VECS; ci = ci + 1u) {",
                    "for (var ei = 0u; ei < 4u; ei = ei + 1u) {",
                ],
                "col0 + 4u * LANES * ci + ei",
            ),
        };
        let pad = |depth: usize| "    ".repeat(depth);
        let depth = loops.len() + 1;
        let mut lines = vec![
            String::new(),
            "    // This invocation's sums of its columns over its rows, as its row of sums."
                .into(),
        ];
        lines.extend(
            loops
                .iter()
                .enumerate()
                .map(|(d, l)| format!("{}{l}", pad(d + 1))),
        );
        lines.push(format!("{}let col = {col};", pad(depth)));
        lines.push(format!("{}if col < N {{", pad(depth)));
        lines.extend(
            self.store
                .iter()
                .map(|st| format!("{}{st}", pad(depth + 1))),
        );
        lines.push(format!("{}}}", pad(depth)));
        lines.extend((1..depth).rev().map(|d| format!("{}}}", pad(d))));
        lines.join("\n")
    }
}

/// The tiles of rows in which a product's kernel computes its `anchor`'s output, where its
/// template can sum a term of each output element over a tile's rows (`fusion`'s column sums):
/// 2-D products on the columns template (CPU targets; a row of sums per tile) or the blocked one
/// (a row per row of invocations of a tile). None for the 16 x 16 template.
pub(super) fn row_tiles(
    graph: &Graph,
    anchor: NodeId,
    target: Target,
    subgroup: Option<u32>,
) -> Option<usize> {
    let shape = graph.shape(anchor);
    let r = shape.len();
    if !matches!(graph.node(anchor).op, Op::MatMul | Op::Gemm { .. }) || r < 2 {
        return None;
    }
    // Output matrices of `m` rows, `batch` of them (a MatMul's batch dims lead its output).
    let (batch, m) = (numel(&shape[..r - 2]), shape[r - 2]);
    match MatmulShape::choose(target, m, shape[r - 1], subgroup) {
        MatmulShape::Columns { rows, .. } => Some(batch * m.div_ceil(rows)),
        MatmulShape::Blocked { tile_m, vb, .. } => {
            Some(batch * m.div_ceil(tile_m) * tile_m / (4 * vb))
        }
        MatmulShape::Tiled => None,
    }
}

/// The element strides of each axis of a matmul operand in the memory of `src`, the value it
/// reads (itself, or the source of a transpose read in place with `perm`): None where that is
/// `src`'s own contiguous layout, which the emitters write out by its dimensions.
fn operand_strides(
    graph: &Graph,
    src: NodeId,
    perm: Option<&[usize]>,
    pitch: &BTreeMap<NodeId, usize>,
) -> Option<Vec<usize>> {
    let padded = match (pitch.get(&src), graph.shape(src)) {
        (Some(&p), &[_, _]) => Some(vec![p, 1]),
        _ => None,
    };
    let Some(perm) = perm else { return padded };
    let st = padded.unwrap_or_else(|| strides(graph.shape(src)));
    Some(perm.iter().map(|&p| st[p]).collect())
}

/// The element strides, in the memory of a transpose's source of shape `src`, of each axis of
/// the transposed value (`perm` as in `Op::Transpose`).
fn permuted_strides(src: &[usize], perm: &[usize]) -> Vec<usize> {
    let st = strides(src);
    perm.iter().map(|&p| st[p]).collect()
}

/// `i * 16u + p`: the WGSL sum of index variables times constant strides.
fn index_sum(terms: &[(&str, usize)]) -> String {
    let parts: Vec<String> = terms
        .iter()
        .map(|&(v, st)| match st {
            1 => v.to_string(),
            st => format!("{v} * {st}u"),
        })
        .collect();
    parts.join(" + ")
}

/// Which matmul template computes an `m` x `n` output, with its tile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum MatmulShape {
    /// `matmul.wgsl`: a 16 x 16 tile, one output per invocation (tiny products).
    #[default]
    Tiled,
    /// `matmul_blocked.wgsl`: a `4 vb` x `4 vb` block per invocation, 256 invocations.
    Blocked {
        tile_m: usize,
        tile_n: usize,
        vb: usize,
    },
    /// `matmul_columns.wgsl` (CPU targets): `rows` rows broadcast to `lanes` invocations that
    /// own `4 * vecs` columns each.
    Columns {
        rows: usize,
        vecs: usize,
        lanes: usize,
    },
}

impl MatmulShape {
    fn choose(target: Target, m: usize, n: usize, subgroup: Option<u32>) -> MatmulShape {
        if target == Target::Cpu && n >= COLUMNS_MIN_N {
            let (vecs, lanes) = columns_layout(n, subgroup);
            return MatmulShape::Columns {
                rows: m.clamp(1, COLUMNS_ROWS),
                vecs,
                lanes,
            };
        }
        if target == Target::Gpu && m.min(n) >= WIDE_TILE && m * n >= WIDE_MIN_OUTPUT {
            // Large products on a GPU: 128 x 128 tiles, an 8x8 block per invocation (twice the
            // multiply-adds per workgroup-memory read of a 4x4 block), once there are enough
            // tiles to fill the device.
            return MatmulShape::Blocked {
                tile_m: WIDE_TILE,
                tile_n: WIDE_TILE,
                vb: 2,
            };
        }
        if m.min(n) >= BLOCKED_MIN_SIDE && m * n >= BLOCKED_MIN * BLOCKED_MIN {
            // 64 x 64, or 32 x 128 for products of few rows and 128 x 32 for products of few
            // columns (DoRA's x Aᵀ at rank 16 or 32), all 256 invocations of a 4x4 block.
            let (tile_m, tile_n) = if m <= THIN_M {
                (32, 128)
            } else if n <= THIN_M {
                (128, 32)
            } else {
                (BLOCKED_TILE, BLOCKED_TILE)
            };
            return MatmulShape::Blocked {
                tile_m,
                tile_n,
                vb: 1,
            };
        }
        MatmulShape::Tiled
    }

    /// The output tile one workgroup computes: (rows, columns).
    fn tile(self) -> (usize, usize) {
        match self {
            MatmulShape::Tiled => (TILE, TILE),
            MatmulShape::Blocked { tile_m, tile_n, .. } => (tile_m, tile_n),
            MatmulShape::Columns { rows, vecs, lanes } => (rows, 4 * vecs * lanes),
        }
    }
}

/// The columns template's vec4s per invocation and invocations per workgroup for an output `n`
/// wide, on a device whose subgroups have `subgroup` lanes where it has them.
///
/// Invocations: one SIMD register's worth, the subgroup size rounded up to a multiple of 8 (AVX2's
/// lanes) and at most 32, so the lanes fill whole subgroups and can shuffle A's values among
/// them; a wider workgroup ran 512³ no faster on lavapipe (19.5 GFLOP/s with 8 lanes, 19.2 with
/// 32, both with naga's loop bounding) and leaves fewer workgroups to spread over the cores.
/// Vec4s: the fewest padded columns for the rate each count of vec4s reaches, as measured. More
/// of them feed each value of A to more multiply-adds, but on lavapipe 2 runs as fast as 3 and
/// faster than 4 (the accumulators, 4 x ROWS x VECS values a lane, outnumber a CPU's registers
/// either way), so 3 is taken only where it pads less (n = 96, or 257) and 4 not at all. Padding
/// costs in proportion: MiniLM's 32 x 1536 x 384 product took 3.0 ms as two tiles of 256
/// columns, the second half empty, and 2.1 ms as three of 128.
fn columns_layout(n: usize, subgroup: Option<u32>) -> (usize, usize) {
    let lanes = (subgroup.unwrap_or(8) as usize)
        .next_multiple_of(8)
        .clamp(8, 32);
    // Lavapipe's kernel GFLOP/s at 1 to 4 vec4s per invocation, 16 rows, 8 lanes (`cargo bench
    // --bench matmul`, Mesa 25.0, the mean of two runs of 32 x 768 x 2304, 128 x 768 x 3072 and
    // its transB form, which every width divides). Measured again when the vec4 store path went
    // (`matmul_columns.wgsl`): the table had said [30.5, 33.5, 35.0, 36.5], and the 4 vec4s it
    // chose took 31-45% longer than 2 on Linear layers with their epilogues (512 and 768 wide,
    // 128 and 256 rows).
    const RATE: [f64; 4] = [16.6, 28.1, 26.9, 21.4];
    let cost = |vecs: usize| {
        let width = 4 * vecs * lanes;
        (n.div_ceil(width) * width) as f64 / RATE[vecs - 1]
    };
    let vecs = (1..=4)
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)))
        .unwrap_or(4);
    (vecs, lanes)
}

/// The helpers `row_base(row)` and `reduced_offset(t)` of a reduction of `x_shape` over `axes`:
/// the offset in x of the first term of output `row`, and of its t-th term from there.
fn reduce_index_helpers(x_shape: &[usize], axes: &[usize]) -> [String; 2] {
    let x_strides = strides(x_shape);
    let (mut kept, mut kept_muls, mut red, mut red_muls) = (vec![], vec![], vec![], vec![]);
    for (d, (&e, &s)) in x_shape.iter().zip(&x_strides).enumerate() {
        if axes.contains(&d) {
            red.push(e);
            red_muls.push(s);
        } else {
            kept.push(e);
            kept_muls.push(s);
        }
    }
    [
        format!(
            "// Offset in `x` of the first element summed into output `row`.\n\
             fn row_base(row: u32) -> u32 {{\n    return {};\n}}",
            strided_index("row", &kept, &kept_muls)
        ),
        format!(
            "// Offset, from row_base, of the t-th of the R elements summed into one output.\n\
             fn reduced_offset(t: u32) -> u32 {{\n    return {};\n}}",
            strided_index("t", &red, &red_muls)
        ),
    ]
}

/// The layers of a group that `fusion`'s layer batches put back to back: each from a node of
/// the anchor's op (an element-wise epilogue never has it) to the next.
fn split_layers<'a>(graph: &Graph, group: &'a [NodeId]) -> Vec<&'a [NodeId]> {
    let op = std::mem::discriminant(&graph.node(group[0]).op);
    let starts: Vec<usize> = (0..group.len())
        .filter(|&k| std::mem::discriminant(&graph.node(group[k]).op) == op)
        .collect();
    (0..starts.len())
        .map(|l| &group[starts[l]..starts.get(l + 1).copied().unwrap_or(group.len())])
        .collect()
}

/// Several sums of the same shape over column sums per tile (`fusion`'s column sums), batched
/// into one dispatch by `fusion`'s layer batches (`reduce_sum_layers.wgsl`): `layers` are the
/// group's sums, each with its epilogue.
fn reduce_layers(
    graph: &Graph,
    group: &[NodeId],
    layers: &[&[NodeId]],
    name: &str,
    d: &Decisions,
) -> Result<Emitted> {
    let first = graph.node(group[0]);
    let xs: Vec<NodeId> = layers.iter().map(|l| graph.inputs_of(l[0])[0]).collect();
    let sums: Vec<Option<&ColumnSum>> = xs.iter().map(|x| d.column_sums.get(x)).collect();
    let (Op::Reduce { keepdims, .. }, Some(Some(c))) = (&first.op, sums.first()) else {
        return Err(Error::gpu(format!(
            "kernel {name}: several layers but not sums of column sums (emitter bug)"
        )));
    };
    let x_shape = c.shape(graph.shape(xs[0]));
    for (layer, (&x, sum)) in layers.iter().zip(xs.iter().zip(&sums)) {
        let node = graph.node(layer[0]);
        if node.op != first.op
            || node.shape != first.shape
            || sum.map(|s| s.tiles) != Some(c.tiles)
            || graph.shape(x).last() != x_shape.last()
            || d.term_chains.contains_key(&layer[0])
        {
            return Err(Error::gpu(format!(
                "kernel {name}: '{}' is not a sum of the first layer's shapes (emitter bug)",
                node.label
            )));
        }
    }
    let mut b = Builder::new(graph, &NO_TRANSPOSES);
    b.bind_array("x", &xs);
    for &x in &xs {
        b.shapes.insert(x, x_shape.clone());
    }
    // The rows of sums are added over their one leading axis.
    b.helpers.extend(reduce_index_helpers(&x_shape, &[0]));
    let what = "output element i, from its sum `acc`";
    let finishes = layer_epilogues(&mut b, layers, d, what, 8)?;
    let summaries: Vec<String> = (layers.iter().zip(&xs))
        .map(|(layer, &x)| {
            let summary = format!(
                "reduce_sum of the sums over tiles of rows of '{}' ({}) over axes [0]{} -> {}",
                graph.node(x).label,
                shape_str(&x_shape),
                if *keepdims { " (keepdims)" } else { "" },
                shape_str(&graph.node(layer[0]).shape)
            );
            with_epilogue(graph, summary, layer)
        })
        .collect();
    let rows = numel(&first.shape);
    let groups = rows.div_ceil(64);
    let workgroups = wgsl::grid(groups * layers.len(), d.max_workgroups, name)?;
    let values = vec![
        ("ROWS", rows.to_string()),
        ("R", c.tiles.to_string()),
        ("GRID_X", workgroups[0].to_string()),
        ("GRID_Y", workgroups[1].to_string()),
        ("GROUPS", groups.to_string()),
        ("LAYERS", layers.len().to_string()),
        ("FINISH_FNS", finishes.functions),
        ("FINISH", finishes.cases),
    ];
    let out = *group.last().expect("groups are not empty");
    let summary = layers_summary(summaries);
    b.finish(REDUCE_SUM_LAYERS, name, out, values, workgroups, summary)
}

fn reduce(
    graph: &Graph,
    group: &[NodeId],
    kind: Reduce,
    axes: &[usize],
    name: &str,
    d: &Decisions,
) -> Result<Emitted> {
    let (max_wg, target, transposed) = (d.max_workgroups, d.target, d.transposed);
    let layers = split_layers(graph, group);
    if layers.len() > 1 {
        return reduce_layers(graph, group, &layers, name, d);
    }
    let n = group[0];
    let node = graph.node(n);
    let x_node = graph.inputs_of(n)[0];
    // A term that a product's kernel summed over tiles of its rows (`fusion`'s column sums):
    // the sum adds the tiles' sums of each column.
    let tile_sums = d.column_sums.get(&x_node);
    let prologue = tile_sums.is_none() && d.prologues.contains(&x_node);
    let (x_shape, axes) = match tile_sums {
        Some(c) => (c.shape(graph.shape(x_node)), &[0][..]),
        None => (graph.shape(x_node).to_vec(), axes),
    };
    let rows = numel(&node.shape);
    let r: usize = (x_shape.iter().enumerate())
        .filter(|(d, _)| axes.contains(d))
        .map(|(_, &e)| e)
        .product();
    // On a CPU target, sums over at most REDUCE_LANES_MAX terms take one invocation per
    // output and no barriers (reduce_sum_lanes.wgsl).
    let lanes = target == Target::Cpu
        && kind.def().wgsl.template.name == template::REDUCE_SUM.name
        && r <= REDUCE_LANES_MAX;
    let mut b = Builder::new(graph, transposed);
    // The terms' values: x's elements, or (a prologue) the element-wise op that computes them,
    // from its own inputs at the same index.
    let x_get = if prologue {
        let x = graph.node(x_node);
        let mut lines = vec![];
        let mut args = vec![];
        for (slot, &input) in graph.inputs_of(x_node).iter().enumerate() {
            let (line, value) = b.load(&format!("p{slot}"), input, &x_shape, "    ");
            lines.push(line);
            args.push(value);
        }
        let expr = elementwise_expr(&x.op, x.dtype, &args, &mut b.libs)?;
        format!(
            "// Element i of '{}' ({} {}), computed here from its inputs.\n\
             fn x_get(i: u32) -> f32 {{\n{}\n    return {expr};\n}}",
            wgsl::comment_safe(&x.label),
            x.op.name(),
            shape_str(&x_shape),
            lines.join("\n")
        )
    } else if tile_sums.is_some() {
        b.bind("x", x_node);
        b.shapes.insert(x_node, x_shape.clone());
        format!(
            "// Element i of the sums of '{}' over each tile of rows of the product that computes\n\
             // its terms (one row of sums per tile).\n\
             fn x_get(i: u32) -> f32 {{\n    return x[i];\n}}",
            wgsl::comment_safe(&graph.node(x_node).label)
        )
    } else {
        b.bind("x", x_node);
        "// Element i of the reduced tensor.\nfn x_get(i: u32) -> f32 {\n    return x[i];\n}"
            .to_string()
    };
    b.helpers.push(x_get);
    if tile_sums.is_some() && d.term_chains.contains_key(&n) {
        return Err(Error::gpu(format!(
            "kernel {name}: a sum of column sums per tile cannot compute a chain beside its \
             terms (emitter bug)"
        )));
    }
    // The chain computed beside the terms (see `fusion`), at each term's index in x.
    let beside = match d.term_chains.get(&n).filter(|_| is_sum(&node.op)) {
        Some(chain) => {
            let helper = term_chain(&mut b, chain, d.escapes)?;
            b.helpers.push(helper);
            let indent = if lanes { "        " } else { "            " };
            format!("\n{indent}term_chain(base + reduced_offset(t));")
        }
        None => String::new(),
    };
    if !lanes {
        b.libs.insert(Lib::WorkgroupReduce);
    }
    b.helpers.extend(reduce_index_helpers(&x_shape, axes));
    let keepdims = matches!(node.op, Op::Reduce { keepdims: true, .. });
    // The element transform applied before summing (or taking the maximum: a minimum is the
    // maximum of the negated terms, negated).
    let wgsl = &kind.def().wgsl;
    let (template, term, sign) = (wgsl.template, wgsl.term, wgsl.sign);
    let (template, per_workgroup) = if lanes {
        (REDUCE_SUM_LANES, 64)
    } else {
        (template, 1)
    };
    if sign.is_some() {
        b.libs.insert(Lib::IsNan);
    }
    let summary = format!(
        "{} of {} over axes {axes:?}{} -> {}",
        node.op.name(),
        shape_str(&x_shape),
        if keepdims { " (keepdims)" } else { "" },
        shape_str(&node.shape)
    );
    let workgroups = wgsl::grid(rows.div_ceil(per_workgroup), max_wg, name)?;
    let mut values = vec![
        ("ROWS", rows.to_string()),
        ("R", r.to_string()),
        ("TERM", term.to_string()),
        ("GRID_X", workgroups[0].to_string()),
        ("GRID_Y", workgroups[1].to_string()),
    ];
    values.extend(sign.map(|s| ("SIGN", s.to_string())));
    if is_sum(&node.op) {
        // Output element i's sum `acc` through the epilogue (often none).
        let indent = if lanes { "    " } else { "        " };
        let mut lines = vec![format!("{indent}let v0 = acc; {}", node_comment(graph, n))];
        let (more, last) = epilogue(&mut b, group, 1, indent, d.escapes)?;
        lines.extend(more);
        lines.push(format!("{indent}y[i] = {last};"));
        values.push(("EPILOGUE", lines.join("\n")));
        values.push(("BESIDE", beside));
    }
    let mut summary = with_epilogue(graph, summary, group);
    if let Some(chain) = d.term_chains.get(&n) {
        let ops: Vec<String> = chain.iter().map(|&c| op_title(&graph.node(c).op)).collect();
        summary = format!("{summary}; beside its terms, {}", ops.join(", "));
    }
    let out = *group.last().expect("groups are not empty");
    b.finish(template, name, out, values, workgroups, summary)
}

/// The helper `term_chain(i)` that computes element `i` of each node of `chain` (element-wise
/// nodes of the reduced tensor's element count, each reading earlier ones in registers) and
/// stores the chain's last value and the values read outside it, into bindings `z{k}`.
fn term_chain(b: &mut Builder, chain: &[NodeId], escapes: &BTreeSet<NodeId>) -> Result<String> {
    let graph = b.graph;
    let last = chain.len() - 1;
    let store = |b: &mut Builder, lines: &mut Vec<String>, k: usize| {
        let n = chain[k];
        if k == last || (escapes.contains(&n) && !graph.node(n).op.is_view()) {
            let name = format!("z{k}");
            lines.push(format!("    {name}[i] = w{k};"));
            b.writes.push((name, n));
        }
    };
    let lines = elementwise_steps(b, chain, 0, ("w", "c"), "    ", store)?;
    Ok(format!(
        "// The element-wise chain computed beside the terms: element i of each value, from the\n\
         // term's own index, stored where a reader outside the kernel needs it.\n\
         fn term_chain(i: u32) {{\n{}\n}}",
        lines.join("\n")
    ))
}

/// DoRA's fused column norm (`crate::ops::dora_norm`): one workgroup per 8 output columns, with the
/// element-wise epilogue (clamp, square root, `m / norm`) run by the invocation of each column; on
/// a CPU driver with subgroups, lanes owning features as the row-broadcast matmul's do, summing
/// the squares of the adapted elements (`dora_norm_columns.wgsl`, ranks up to 32) or one
/// invocation per column, A's values
/// shared by subgroup broadcasts (`dora_norm_subgroup.wgsl`). A group may hold several layers of
/// the same shapes back to back, each a DoraNormSq node and its epilogue (`fusion::batch_norms`, on
/// devices with binding arrays): one dispatch then computes them all, the loop reading each layer's
/// W, A and B through binding arrays (one copy of the code, whatever the layer count), each
/// epilogue in a function of its own on its own bindings, and every layer's value but the last
/// written beside the output.
fn dora_norm(
    graph: &Graph,
    group: &[NodeId],
    p: &crate::ops::DoraNorm,
    name: &str,
    d: &Decisions,
) -> Result<Emitted> {
    let n = group[0];
    let ins = graph.inputs_of(n);
    let (w_shape, a_shape) = (graph.shape(ins[0]).to_vec(), graph.shape(ins[1]).to_vec());
    let (fin, fout) = p.in_out(&w_shape);
    let r = a_shape[0];
    let layers = split_layers(graph, group);
    let weights: Vec<Vec<NodeId>> = layers.iter().map(|l| graph.inputs_of(l[0])).collect();
    let w_stored = d.stored.get(&ins[0]).copied();
    let w_pitch = d.pitch.get(&ins[0]).copied();
    for (layer, ws) in layers.iter().zip(&weights) {
        let node = graph.node(layer[0]);
        let same = ws
            .iter()
            .map(|&i| graph.shape(i))
            .eq(ins.iter().map(|&i| graph.shape(i)));
        if node.op != Op::DoraNormSq(*p)
            || !same
            || d.stored.get(&ws[0]).copied() != w_stored
            || d.pitch.get(&ws[0]).copied() != w_pitch
        {
            return Err(Error::gpu(format!(
                "kernel {name}: '{}' is not a DoRA norm of the first layer's shapes and storage \
                 (emitter bug)",
                node.label
            )));
        }
    }
    let mut b = Builder::new(graph, &NO_TRANSPOSES);
    let column = |k: usize| weights.iter().map(|ws| ws[k]).collect::<Vec<NodeId>>();
    // The buffers the loop reads: the one layer's bindings, or pointers to this workgroup's
    // layer in the binding arrays (taken once, before the loop).
    let mut layer_buffers = String::new();
    let (w, a_at, b_at) = if layers.len() == 1 {
        let (w, _) = b.bind_stored("w", ins[0], d.stored);
        (w, b.bind("lora_a", ins[1]), b.bind("lora_b", ins[2]))
    } else {
        if let Some(h) = w_stored {
            for &wn in &column(0) {
                b.mark_stored(wn, h);
            }
        }
        let mut at = |name: &str, nodes: &[NodeId]| {
            let array = b.bind_array(name, nodes);
            layer_buffers += &format!("    let {array}_l = &{array}[layer];\n");
            format!("(*{array}_l).v")
        };
        (
            at("w", &column(0)),
            at("lora_a", &column(1)),
            at("lora_b", &column(2)),
        )
    };
    // On a CPU driver with subgroups: for ranks up to 32, lanes that own features as the
    // row-broadcast matmul's do (`dora_norm_columns.wgsl`); for higher ones one invocation per
    // output feature sharing A's values by broadcasts (`dora_norm_subgroup.wgsl`). Else a
    // shared tile of B A per 8 features.
    let kind = match (d.target, d.subgroup_size) {
        (Target::Cpu, Some(sg)) if (4..=64).contains(&sg) && sg.is_power_of_two() => {
            if r <= NORM_COLUMNS_MAX_RANK {
                NormKernel::Columns(sg)
            } else {
                NormKernel::Subgroup(sg)
            }
        }
        _ => NormKernel::Tiles,
    };
    // W's four loads, written out in the entry point (a helper function would hide from the
    // compiler that `layer`, which indexes the binding arrays, is uniform): the input
    // features f of output feature j, or the output features j of input feature i.
    let (pairs, w_indent) = match kind {
        NormKernel::Columns(_) => (["j.x", "j.y", "j.z", "j.w"].map(|j| (j, "i")), 20),
        NormKernel::Subgroup(_) => (["fc.x", "fc.y", "fc.z", "fc.w"].map(|f| ("j", f)), 16),
        NormKernel::Tiles => (["f.x", "f.y", "f.z", "f.w"].map(|f| ("j", f)), 20),
    };
    // W's rows: `in` or `out` long, or padded (`storage::padded_rows`).
    let w_row = |own: &str| w_pitch.map_or(own.to_string(), wgsl::u32_lit);
    let w_load = |(j, i): (&str, &str)| {
        let at = if p.weight_out_in {
            format!("{j} * {} + {i}", w_row("IN"))
        } else {
            format!("{i} * {} + {j}", w_row("OUT"))
        };
        let load = storage::stored_load(&w, &at, w_stored);
        format!("{:w_indent$}{load}", "")
    };
    let wv = pairs.map(w_load).join(",\n");
    let finish_indent = match kind {
        NormKernel::Columns(_) => 20,
        _ => 12,
    };
    let w_note = match w_stored {
        Some(h) => format!(", stored as {}", h.name()),
        None => String::new(),
    };
    let finishes = layer_epilogues(
        &mut b,
        &layers,
        d,
        "output feature i, from its squared norm `acc`",
        finish_indent,
    )?;
    let summaries: Vec<String> = (layers.iter())
        .map(|layer| with_epilogue(graph, norm_summary(graph, layer[0], p), layer))
        .collect();
    let summary = layers_summary(summaries);
    // The kernel's shape: workgroups per layer and its own constants.
    let (template, groups, shape) = match kind {
        NormKernel::Columns(sg) => {
            // Each lane keeps R x VECS vec4s of B (NORM_COLUMNS_VEC4S).
            let (vecs, _) = columns_layout(fout, Some(sg));
            let vecs = vecs.min((NORM_COLUMNS_VEC4S / r).max(1));
            let tile = 4 * vecs * sg as usize;
            let macs = layers.len() * fout * fin * r;
            let shape = vec![
                ("SG", sg.to_string()),
                ("VECS", vecs.to_string()),
                ("STEPS", block_steps(fin, sg as usize, "SG", "IN", "i0")),
                ("BOUND", loop_bound(macs).to_string()),
            ];
            (template::DORA_NORM_COLUMNS, fout.div_ceil(tile), shape)
        }
        NormKernel::Subgroup(sg) => {
            // ba[c] += B[j, k] A[k, i0 + 4 c .. i0 + 4 c + 3], A's values broadcast from the
            // lanes that loaded them.
            let broadcasts: Vec<String> = (0..sg / 4)
                .map(|c| {
                    let lanes: Vec<String> = (4 * c..4 * c + 4)
                        .map(|l| format!("subgroupBroadcast(a, {l}u)"))
                        .collect();
                    format!(
                        "            ba[{c}] = fma(bk, vec4<f32>({}), ba[{c}]);",
                        lanes.join(", ")
                    )
                })
                .collect();
            let shape = vec![
                ("SG", sg.to_string()),
                ("BROADCASTS", broadcasts.join("\n")),
            ];
            (template::DORA_NORM_SUBGROUP, fout.div_ceil(64), shape)
        }
        NormKernel::Tiles => {
            // Output features per workgroup and vec4s of input features per invocation: the
            // shape of the row-broadcast matmul (see MatmulShape::Columns), which keeps the
            // accumulators in registers on a CPU driver.
            let rows = fout.clamp(1, NORM_ROWS);
            let shape = vec![
                ("ROWS", rows.to_string()),
                ("VECS", norm_vecs(fin).to_string()),
            ];
            (template::DORA_NORM, fout.div_ceil(rows), shape)
        }
    };
    let workgroups = wgsl::grid(groups * layers.len(), d.max_workgroups, name)?;
    let mut values = vec![
        ("IN", fin.to_string()),
        ("OUT", fout.to_string()),
        ("R", r.to_string()),
        ("ALPHA", wgsl::f32_lit(p.alpha)?),
        ("S", wgsl::f32_lit(p.scale)?),
        ("GROUPS", groups.to_string()),
        ("LAYERS", layers.len().to_string()),
        ("GRID_X", workgroups[0].to_string()),
        ("GRID_Y", workgroups[1].to_string()),
        ("A", a_at),
        ("B", b_at),
        ("WV", wv),
        ("LAYER_BUFFERS", layer_buffers),
        ("W_NOTE", w_note),
        ("FINISH_FNS", finishes.functions),
        ("FINISH", finishes.cases),
    ];
    values.extend(shape);
    b.finish(
        template,
        name,
        *group.last().unwrap(),
        values,
        workgroups,
        summary,
    )
}

/// The epilogues of a kernel computing several layers at once (`fusion`'s layer batches), each
/// a function `l{l}_finish(i, acc)` on bindings of its own (`finish(i, acc)` for one layer),
/// and the `switch layer` cases (indented by `indent`) that call them.
struct LayerEpilogues {
    functions: String,
    cases: String,
}

/// Renders [`LayerEpilogues`] for `layers` (each an anchor and its epilogue): each turns the
/// anchor's value `acc` at output element `i` (`what` says which) into its stored value; the
/// last layer's goes to `y`, the others' are written beside it.
fn layer_epilogues(
    b: &mut Builder,
    layers: &[&[NodeId]],
    d: &Decisions,
    what: &str,
    indent: usize,
) -> Result<LayerEpilogues> {
    let graph = b.graph;
    let (mut functions, mut cases) = (vec![], vec![]);
    for (l, layer) in layers.iter().enumerate() {
        b.scope = if layers.len() > 1 {
            format!("l{l}_")
        } else {
            String::new()
        };
        let pad = "    ";
        let mut lines = vec![format!(
            "{pad}let v0 = acc; {}",
            node_comment(graph, layer[0])
        )];
        let (more, last) = epilogue(b, layer, 1, pad, d.escapes)?;
        lines.extend(more);
        let out = if l + 1 == layers.len() {
            "y".to_string()
        } else {
            let out = format!("{}y", b.scope);
            b.writes.push((out.clone(), *layer.last().unwrap()));
            out
        };
        lines.push(format!("{pad}{out}[i] = {last};"));
        let label = wgsl::comment_safe(&graph.node(layer[0]).label);
        functions.push(format!(
            "// The epilogue of '{label}' for {what}.\n\
             fn {}finish(i: u32, acc: f32) {{\n{}\n}}",
            b.scope,
            lines.join("\n")
        ));
        cases.push(format!(
            "{0:indent$}case {l}u: {{\n{0:indent$}    {1}finish(i, acc);\n{0:indent$}}}",
            "", b.scope
        ));
    }
    b.scope.clear();
    Ok(LayerEpilogues {
        functions: functions.join("\n\n"),
        cases: cases.join("\n"),
    })
}

/// A kernel's summary from its layers' (`k layers: ...` for several).
fn layers_summary(mut summaries: Vec<String>) -> String {
    match summaries.len() {
        1 => summaries.remove(0),
        k => format!("{k} layers: {}", summaries.join("; ")),
    }
}

/// The DoRA norm templates, by the adapter they suit (see `dora_norm`).
#[derive(Clone, Copy)]
enum NormKernel {
    /// `dora_norm_columns.wgsl`, subgroups of this size.
    Columns(u32),
    /// `dora_norm_subgroup.wgsl`, subgroups of this size.
    Subgroup(u32),
    /// `dora_norm.wgsl`: portable, workgroup memory and barriers.
    Tiles,
}

/// The vec4s of B each lane of `dora_norm_columns.wgsl` keeps, R x VECS at most: fewer
/// features per lane than the row-broadcast matmul's layout gives, so that the rows of B stay
/// in registers and a layer has more workgroups. Lavapipe, four 512 x 512 layers batched (the
/// train bench's profile, `DORAC_BENCH_RANK`): rank 16 at 4 vec4s per lane 2.5 ms, 2 1.78, 1
/// 1.69; rank 8 at 4 1.67, 2 1.14, 1 1.19; rank 4 at 4 1.13, 2 0.92, 1 1.31.
const NORM_COLUMNS_VEC4S: usize = 8;
/// The highest rank `dora_norm_columns.wgsl` takes. Rank 32 (one vec4 per lane): 2.64-2.70 ms
/// against 8.4-11.6 for `dora_norm_subgroup.wgsl`; rank 64 spills (21.5 ms against 15.3).
const NORM_COLUMNS_MAX_RANK: usize = 32;

/// One line on the DoRA norm node `n`: attributes and shapes.
fn norm_summary(graph: &Graph, n: NodeId, p: &crate::ops::DoraNorm) -> String {
    let ins = graph.inputs_of(n);
    format!(
        "dora_norm_sq alpha={} s={}: W {}{}, A {}, B {} -> {}",
        p.alpha,
        p.scale,
        shape_str(graph.shape(ins[0])),
        if p.weight_out_in { " (out x in)" } else { "" },
        shape_str(graph.shape(ins[1])),
        shape_str(graph.shape(ins[2])),
        shape_str(&graph.node(n).shape)
    )
}

/// Vec4s of input features per invocation of the norm kernel (a tile is 256 of them): 1 to 3,
/// whichever pads `fin` least, the most of those. Measured on lavapipe: 512 inputs run best as
/// one tile of 2 vec4s (1.05 ms against 1.4 with 3), 768 as one of 3 (6.8 ms for 768 x 2304
/// against 9.0 to 9.5 with two tiles of 2, the second half empty); 4 spill (1.8 to 2.2 ms at
/// 512).
fn norm_vecs(fin: usize) -> usize {
    let padded = |v: usize| fin.div_ceil(256 * v) * 256 * v;
    (1..=3usize)
        .min_by_key(|&v| (padded(v), std::cmp::Reverse(v)))
        .unwrap_or(1)
}

fn layer_norm(
    graph: &Graph,
    n: NodeId,
    axis: usize,
    epsilon: f32,
    name: &str,
    max_wg: u32,
) -> Result<Emitted> {
    let ins = graph.inputs_of(n);
    let x_shape = graph.shape(ins[0]).to_vec();
    let norm_shape = &x_shape[axis..];
    let (rows, d) = (numel(&x_shape[..axis]), numel(norm_shape));
    let mut b = Builder::new(graph, &NO_TRANSPOSES);
    b.bind("x", ins[0]);
    b.bind("scale", ins[1]);
    b.libs.insert(Lib::WorkgroupReduce);
    let scale_shape = graph.shape(ins[1]);
    let mut output = format!(
        "((x[base + t] - shift) - rel_mean) * inv_std * scale[{}]",
        broadcast_index("t", scale_shape, norm_shape)
    );
    let mut params = format!("scale {}", shape_str(scale_shape));
    if let Some(&bias) = ins.get(2) {
        b.bind("bias", bias);
        let bias_shape = graph.shape(bias);
        output += &format!(" + bias[{}]", broadcast_index("t", bias_shape, norm_shape));
        params += &format!(", bias {}", shape_str(bias_shape));
    }
    let summary = format!(
        "layer_norm of {} over dims {axis}.. (eps {epsilon:e}), {params}",
        shape_str(&x_shape)
    );
    let workgroups = wgsl::grid(rows, max_wg, name)?;
    b.finish(
        template::LAYER_NORM,
        name,
        n,
        vec![
            ("ROWS", rows.to_string()),
            ("D", d.to_string()),
            ("EPS", wgsl::f32_lit(epsilon)?),
            (
                "BIAS_NOTE",
                if ins.len() > 2 { " + bias" } else { "" }.to_string(),
            ),
            ("OUTPUT", output),
            ("GRID_X", workgroups[0].to_string()),
            ("GRID_Y", workgroups[1].to_string()),
        ],
        workgroups,
        summary,
    )
}

fn softmax(graph: &Graph, n: NodeId, axis: usize, name: &str, max_wg: u32) -> Result<Emitted> {
    let x_node = graph.inputs_of(n)[0];
    let shape = graph.shape(x_node).to_vec();
    let len = shape[axis];
    let inner = numel(&shape[axis + 1..]);
    let rows = numel(&shape[..axis]) * inner;
    let mut b = Builder::new(graph, &NO_TRANSPOSES);
    b.bind("x", x_node);
    let summary = format!("softmax of {} along axis {axis}", shape_str(&shape));
    // Short rows (attention over a short sequence) take an invocation each; longer ones a
    // workgroup each, which reduces by a tree.
    let (template, workgroups) = if len <= SHORT_SOFTMAX {
        (
            template::SOFTMAX_ROWS,
            wgsl::grid(rows.div_ceil(64), max_wg, name)?,
        )
    } else {
        b.libs.insert(Lib::WorkgroupReduce);
        (template::SOFTMAX, wgsl::grid(rows, max_wg, name)?)
    };
    b.finish(
        template,
        name,
        n,
        vec![
            ("ROWS", rows.to_string()),
            ("LEN", len.to_string()),
            ("INNER", inner.to_string()),
            ("GRID_X", workgroups[0].to_string()),
            ("GRID_Y", workgroups[1].to_string()),
        ],
        workgroups,
        summary,
    )
}

/// `SoftmaxCrossEntropy` (one workgroup, a scalar) and `SoftmaxCrossEntropyGrad` (one workgroup
/// per position): the templates share `row_softmax_stats` and the generated `class_of` helper,
/// which bakes in the label rules (shift, ignore_index, range).
fn cross_entropy(
    graph: &Graph,
    n: NodeId,
    ignore_index: i64,
    shift: bool,
    name: &str,
    max_wg: u32,
) -> Result<Emitted> {
    let node = graph.node(n);
    let grad = matches!(node.op, Op::SoftmaxCrossEntropyGrad { .. });
    let ins = graph.inputs_of(n);
    let logits_shape = graph.shape(ins[0]).to_vec();
    let c = *logits_shape
        .last()
        .expect("shape checked: logits have a class dim");
    let rows = numel(graph.shape(ins[1]));
    // (At least 1: with no positions there are no rows, and the modulus must not be 0.)
    let seq = if shift {
        logits_shape[logits_shape.len() - 2].max(1)
    } else {
        1
    };
    let mut b = Builder::new(graph, &NO_TRANSPOSES);
    b.bind("logits", ins[0]);
    b.bind("labels", ins[1]);
    if grad {
        b.bind("dloss", ins[2]);
    }
    b.libs.insert(Lib::WorkgroupReduce);
    b.libs.insert(Lib::RowSoftmaxStats);
    b.helpers.push(target_helper(ignore_index, shift, seq, c)?);
    let summary = format!(
        "{} of logits {} and labels {} (ignore_index {ignore_index}{}) -> {}",
        node.op.name(),
        shape_str(&logits_shape),
        shape_str(graph.shape(ins[1])),
        if shift { ", shifted" } else { "" },
        shape_str(&node.shape),
    );
    let mut values = vec![("ROWS", rows.to_string()), ("C", c.to_string())];
    let (template, workgroups) = if grad {
        let workgroups = wgsl::grid(rows, max_wg, name)?;
        values.push(("GRID_X", workgroups[0].to_string()));
        values.push(("GRID_Y", workgroups[1].to_string()));
        (template::CROSS_ENTROPY_GRAD, workgroups)
    } else {
        (template::CROSS_ENTROPY, [1, 1, 1])
    };
    b.finish(template, name, n, values, workgroups, summary)
}

/// `fn class_of(row: u32) -> i32`: the class position `row` is scored against, or -1 when it does
/// not count, exactly as the reference decides: the label (the next position's with `shift`,
/// where the last position of each sequence of `seq` has none) truncated to an integer, unless it
/// is `ignore_index`, negative, or not below `c`.
fn target_helper(ignore_index: i64, shift: bool, seq: usize, c: usize) -> Result<String> {
    let mut body = String::new();
    let label_at = if shift {
        body += &format!(
            "    if row % {} == {} {{\n        return -1; // the last position of a sequence has no next label\n    }}\n",
            wgsl::u32_lit(seq),
            wgsl::u32_lit(seq - 1)
        );
        "row + 1u"
    } else {
        "row"
    };
    body += &format!("    let l = labels[{label_at}];\n");
    let c_lit = wgsl::f32_lit(c as f32)?;
    // A negative ignore_index (the usual -100) is already covered by `l < 0.0`, and one of C or
    // more by `l >= C`: only a class id in range needs its own test.
    let ignore = if ignore_index >= 0 && (ignore_index as u64) < c as u64 {
        format!(" || trunc(l) == {}", wgsl::f32_lit(ignore_index as f32)?)
    } else {
        String::new()
    };
    body += &format!(
        "    if l < 0.0 || l >= {c_lit}{ignore} {{\n        return -1;\n    }}\n    return i32(l);"
    );
    let rule = if ignore.is_empty() {
        format!("ignore_index {ignore_index} lies outside [0, C), so it needs no test of its own")
    } else {
        format!("neither does ignore_index {ignore_index}")
    };
    let shifted = if shift {
        "\n// Shifted (next-token loss): position `row` is scored against the label of `row + 1`."
    } else {
        ""
    };
    Ok(format!(
        "// The class that position `row` is scored against, or -1 when it does not count. Labels\n\
         // are class ids stored as f32 (truncated); a label outside [0, C) does not count, and\n\
         // {rule}.{shifted}\n\
         fn class_of(row: u32) -> i32 {{\n{body}\n}}"
    ))
}
