//! Fusion decisions: which IR nodes share a kernel, and which need no kernel at all. Every rule
//! that decides fusion lives in this file; the emitters (`kernels`) render whatever it decides.
//!
//! **Operand transposes** ([`operand_transposes`]): a Transpose whose every live reader is a
//! MatMul or Gemm operand (A or B) or an operand of an element-wise op gets no kernel and no
//! buffer. Its readers index the transpose's source in place: a matmul swaps the strides of the
//! operand (`A[i, p]` read at `p * M + i`), an element-wise load walks the source with permuted
//! strides. So DoRA's `Aᵀ`, `Bᵀ` and the transposes autodiff makes for `dA = dY Bᵀ` cost nothing.
//!
//! **Groups** ([`decide`]): a group is one kernel: an anchor (any op with a kernel) followed by
//! element-wise nodes (and views) of the anchor's element count, in an order where each reads
//! only values computed before it. Its last node is its value; an interior value that something
//! outside the group needs (a graph output, a state's next value, a reader in another kernel) is
//! written beside it ([`escaping`]: a DoRA layer's `u`, kept for the magnitude gradient, or an
//! Adam moment), and every other one stays in registers. Anchors are taken in two passes over
//! the schedule: first the ops that are not element-wise (matmuls, reductions, index maps), so a
//! matmul claims the element-wise work around its output before an element-wise node could start
//! a kernel of its own; then the element-wise nodes left over. A group grows by two moves, while
//! the kernel stays within `max_bindings` storage buffers ([`PORTABLE_BINDINGS`] unless the plan
//! is made for a device):
//!
//! - *Epilogue*: a live consumer `c` of the group's value `v` joins when `c` is element-wise,
//!   needs a kernel (a view does not) and has the anchor's element count (an epilogue runs at
//!   the anchor's flat output index, which a view or a same-count element-wise op keeps: a
//!   sum's `1 x n` result goes on through a reshape to `n`). When `v` has several consumers,
//!   `c` is the earliest scheduled that can join; the others may join later as side operands
//!   (AdamW's second moment reads the gradient its first moment read, and the gradient then
//!   stays in registers) or read `v` from memory. A join stands only while every reader outside
//!   the group of a value computed in it is scheduled after the group's last node (`fits`):
//!   those read memory the kernel writes, and the kernel may run as late as that node. A view
//!   read alone (DoRA's StopGradient, a reshape) passes the value on in registers.
//!   When `c` also reads the value of a product that does more multiply-adds than the anchor
//!   and has no group yet, `c` is left to that product (`larger_product_reads`): a layer's
//!   backward adds the low-rank path's `dx` to the base product's, and the add belongs in the
//!   larger kernel, which would otherwise write its whole output for the smaller one to read.
//! - *Side operand*: before `c` joins, each of its other operands that is itself element-wise,
//!   of the anchor's element count, not yet in a kernel, and read by `c` alone joins too (with
//!   its own side operands, recursively); a kept one (a state's next value, a graph output) is
//!   written beside the output. Its value is computed in the same invocation, so a parameter's
//!   whole AdamW update runs in the epilogue of the product that computes its gradient.
//!
//! **Sums of products** ([`Context::product_sums`], the rule in `product_sums`): a product whose
//! one reader adds it to another product of the same shape (or to that product times a scalar),
//! where nothing else reads either, starts a group `[p1, p2, (mul,) add]` anchored at the one of
//! more multiply-adds, before any group is formed (the second may be scheduled first). Its kernel
//! runs its K loop over both products into one accumulator, and the group grows from the add like
//! any other: a LoRA or DoRA layer's `x W0ᵀ + s (x Aᵀ) Bᵀ` and its backward `dY W0 + (dY B) A`
//! are one kernel each, and the low-rank product's output is never stored.
//!
//! **Reduction prologues** ([`is_reduce_prologue`]): an element-wise node that would start a
//! kernel of its own (no kernel claimed it as an epilogue) and whose one live reader is a
//! reduction gets no kernel and no buffer: the reduction computes it as it loads each term.
//! DoRA's magnitude gradient `sum(dY * u)` is then one kernel, not two and a temporary.
//!
//! **Layer batches** ([`batch_norms`], [`batch_sums`], on devices that bind arrays of buffers):
//! DoRA's norm kernels read only their layer's parameters, so every layer's could run at the
//! start of the step. Norm groups of the same shapes, attributes and weight storage are put back
//! to back in one group (as many as `max_bindings` allows), which one dispatch computes: the
//! loop reads each layer's W, A and B through binding arrays, so its code exists once and the
//! driver compiles it once (one copy per layer made a four-layer kernel compile 8x as long), and
//! each layer's epilogue runs on its own bindings (`kernels::dora_norm`). Likewise the sums of
//! column sums (below) of the same shapes, whose epilogues update each layer's magnitude: one
//! dispatch at the end of the backward pass instead of one per layer (`kernels::reduce_layers`).
//!
//! **Column sums** ([`host_column_sums`]): a sum over the rows of a matrix whose terms (a
//! reduction prologue) read a value that a 2-D product's kernel computes, at its own index, is
//! summed in part by that kernel: each invocation adds each of its elements' term to its sum of
//! that column over its rows and stores one row of such sums (`kernels::row_tiles`: a row per
//! tile of 16 rows on the CPU template, whose invocations own whole columns of a tile; a row per
//! row of invocations, 4 or 8 rows, on the blocked one); the sum's kernel then adds those. DoRA's
//! magnitude gradient `sum(dY * u)` is computed where `dY` is: neither `dY` nor `u` is read
//! again, the last layer's `u`, computed in the same kernel, is never stored, and `dY * g`,
//! which the sum used to compute beside its terms, joins the product as a late epilogue (late
//! epilogues are decided first, so that the loss gradient is in the last layer's product).
//!
//! **Term chains** ([`host_term_chains`]): an element-wise group left with a kernel of its own
//! that reads, element for element, a tensor a sum also reads (the sum's input, or an input of
//! its prologue) is computed by the sum as it loads each term, and written from there: each
//! term is loaded once, by one invocation, so its index is the chain's too. DoRA's backward
//! reads `dY` for the magnitude gradient `sum(dY * u)` and for `dY * g`; both then come from
//! one pass over `dY`. Only sums of at least [`TERM_CHAIN_MIN_SUMS`] outputs take one: a sum
//! to a few values runs on a few workgroups, and the element-wise kernel would have had many.
//!
//! **Late epilogues** ([`absorb_late_epilogues`]): an element-wise group left with a kernel of
//! its own whose first node reads the value of another kernel of its element count joins that
//! kernel's end, where no kernel would then need, directly or through others, a value it
//! computes itself. `grow` refuses such a join when a value of the group is read by a node
//! scheduled before the joining one (the kernel could run that late), but the kernels are
//! ordered by what they read, not by the schedule: DoRA's `s * (dY * g)` for the first layer
//! joins the product computing `dY`, whose `dY` the magnitude gradient reads earlier, and the
//! loss gradient joins the last layer's forward product.
//!
//! **Operand prologues** ([`host_operand_prologues`]): a recomputation (`Graph::recomputed`)
//! that only products read, directly or through a transpose they read in place, is computed by
//! each of them as it loads the operand (the `a_get` / `b_get` helper of its kernel), so it is
//! never stored: DoRA's activation, recomputed from `u` for the next layer's `dA` product.
//!
//! Nothing a group reads from outside can depend on a value inside it: the path would leave the
//! group through an outside reader of that value, which `fits` places after the group's last
//! node, and so after the group node that reads the path's end. Nor can two groups read each
//! other's values (layer batches, term chains and late epilogues, which join kernels across the
//! schedule, check this over all kernels). So the groups can be put in an order
//! (`plan_grouped` runs each kernel as soon as what it reads is computed). The groups satisfy
//! the contract of [`super::plan_grouped`], which checks it again.

use super::kernels::{is_elementwise, is_sum, row_tiles, takes_epilogue};
use super::{has_kernel, product_sums, schedule};
use crate::error::Result;
use crate::ir::{Graph, NodeId, Op};
use crate::tensor::numel;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Storage buffers one kernel may bind (inputs and outputs) in a portable plan: WebGPU's
/// guaranteed minimum of `max_storage_buffers_per_shader_stage`, so the plan runs on every
/// adapter. A plan made for one device takes that device's limit instead
/// ([`crate::codegen::PlanOptions::max_bindings`]): lavapipe allows 48, and wider kernels let
/// a matmul keep its whole epilogue and AdamW update a parameter in one kernel.
pub const PORTABLE_BINDINGS: usize = 8;

/// The fewest outputs a sum must have to take a term chain (module docs). A sum's kernel runs
/// one workgroup per output (64 outputs per workgroup on a CPU target): with fewer, the chain's
/// element-wise work would run on fewer workgroups than a kernel of its own gives it.
pub const TERM_CHAIN_MIN_SUMS: usize = 64;

/// What the fusion pass decided: the kernel groups and the transposes read in place.
#[derive(Clone, Debug, Default)]
pub struct Fusion {
    /// Kernel groups, each an anchor followed by the element-wise nodes it computes in registers
    /// (often just the anchor).
    pub groups: Vec<Vec<NodeId>>,
    /// Transposes that no kernel computes: their readers index the source (see the module docs).
    pub operand_transposes: BTreeSet<NodeId>,
    /// Element-wise nodes that their one reader, a reduction, computes as it loads them.
    pub reduce_prologues: BTreeSet<NodeId>,
    /// For a sum's anchor, the element-wise chain (a group of the sum's input's shape: its
    /// first node, then the nodes reading earlier ones) that its kernel computes beside each
    /// term it loads, writing the chain's last value and those read outside it.
    pub term_chains: BTreeMap<NodeId, Vec<NodeId>>,
    /// The matrices stored with padded rows, with their row pitch (`storage::padded_rows`; CPU
    /// targets only): decided here because the layers a batched norm joins must share W's.
    pub row_pitch: BTreeMap<NodeId, usize>,
    /// Terms of sums over rows that a product's kernel sums over each tile of its rows (module
    /// docs: *column sums*), by term: their buffers hold those sums, one row per tile.
    pub column_sums: BTreeMap<NodeId, ColumnSum>,
    /// Recomputations that only products read, by the value the products read (module docs:
    /// *operand prologues*): the element-wise chain that computes it, operands first, which
    /// each of those products computes as it loads the operand. No kernel computes them.
    pub operand_prologues: BTreeMap<NodeId, Vec<NodeId>>,
    /// Recomputations that no reader's kernel could compute: each anchors a kernel of its own
    /// or joins one that does (`codegen::undo_unhosted_recomputations` gives their readers the
    /// original back where it is still computed).
    pub unhosted: BTreeSet<NodeId>,
}

/// Where a term of a sum over rows is summed per tile of rows (module docs: *column sums*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnSum {
    /// The anchor of the product whose kernel computes the term.
    pub product: NodeId,
    /// The tiles of rows that kernel computes the product's output in: the rows of the term's
    /// buffer.
    pub tiles: usize,
}

impl ColumnSum {
    /// The shape of the buffer of sums of a term of shape `term`: a row of its columns per tile.
    pub fn shape(&self, term: &[usize]) -> Vec<usize> {
        vec![self.tiles, *term.last().unwrap_or(&1)]
    }
}

/// Each kernel's nodes: its group, the chain it computes beside a sum's terms and the terms it
/// sums over its tiles of rows.
pub(super) fn kernel_members(
    groups: &[Vec<NodeId>],
    chains: &BTreeMap<NodeId, Vec<NodeId>>,
    column_sums: &BTreeMap<NodeId, ColumnSum>,
) -> Vec<Vec<NodeId>> {
    groups
        .iter()
        .map(|g| {
            let mut k = g.clone();
            k.extend(chains.get(&g[0]).into_iter().flatten());
            k.extend(terms_of(column_sums, g[0]));
            k
        })
        .collect()
}

/// The terms that the kernel of the product anchored at `anchor` sums over its tiles of rows.
pub(super) fn terms_of(
    column_sums: &BTreeMap<NodeId, ColumnSum>,
    anchor: NodeId,
) -> impl Iterator<Item = NodeId> + '_ {
    (column_sums.iter())
        .filter(move |(_, c)| c.product == anchor)
        .map(|(&t, _)| t)
}

impl From<Vec<Vec<NodeId>>> for Fusion {
    /// Given groups, with every transpose computed by a kernel of its own.
    fn from(groups: Vec<Vec<NodeId>>) -> Self {
        Fusion {
            groups,
            operand_transposes: BTreeSet::new(),
            reduce_prologues: BTreeSet::new(),
            term_chains: BTreeMap::new(),
            row_pitch: BTreeMap::new(),
            column_sums: BTreeMap::new(),
            operand_prologues: BTreeMap::new(),
            unhosted: BTreeSet::new(),
        }
    }
}

/// The fusion decisions for `graph`, for kernels of at most `options.max_bindings` storage
/// buffers. With `options.fuse` off, one group per computing node and no transposes read in
/// place.
pub fn decide(graph: &Graph, options: &super::PlanOptions) -> Result<Fusion> {
    let (fuse, max_bindings) = (options.fuse, options.max_bindings);
    let order = schedule::order(graph)?;
    let live = schedule::live(graph);
    let position = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut ctx = Context {
        graph,
        live: &live,
        kept: kept(graph),
        taken: HashSet::new(),
        position,
        max_bindings,
    };
    let operand_transposes = if fuse {
        operand_transposes(graph, &live, &ctx.kept)
    } else {
        BTreeSet::new()
    };
    ctx.taken.extend(operand_transposes.iter().copied());
    let needs_kernel = |n: NodeId| live.contains(&n) && has_kernel(&graph.node(n).op);
    let mut groups = vec![];
    let mut reduce_prologues = BTreeSet::new();
    // A recomputation (`Graph::recomputed`) anchors no group before its readers have had the
    // chance to compute it as a side operand: only the ones left over get kernels of their own.
    let recomputed = graph.recomputed();
    let mut operand_prologues = BTreeMap::new();
    let mut unhosted = BTreeSet::new();
    // Sums of two products start their groups before any group could take a second product
    // (which may be scheduled before the first).
    let mut sums = if fuse {
        ctx.product_sums(&order)
    } else {
        HashMap::new()
    };
    let passes = [(false, false), (true, false), (true, true)];
    for (elementwise_pass, leftovers) in passes {
        if fuse && leftovers {
            operand_prologues = host_operand_prologues(&mut ctx, &groups, &operand_transposes);
        }
        for &anchor in &order {
            if let Some(mut group) = sums.remove(&anchor) {
                ctx.grow(&mut group);
                groups.push(group);
                continue;
            }
            if !needs_kernel(anchor)
                || ctx.taken.contains(&anchor)
                || is_elementwise(&graph.node(anchor).op) != elementwise_pass
                || (fuse && recomputed.contains_key(&anchor) != leftovers)
            {
                continue;
            }
            ctx.taken.insert(anchor);
            if fuse
                && elementwise_pass
                && is_reduce_prologue(graph, anchor, &live, &ctx.kept, max_bindings)
            {
                reduce_prologues.insert(anchor);
                continue;
            }
            let mut group = vec![anchor];
            if fuse && elementwise_pass {
                ctx.recomputed_operands(&mut group);
            }
            if fuse && takes_epilogue(&graph.node(anchor).op) {
                ctx.grow(&mut group);
            }
            if leftovers {
                unhosted.extend(group.iter().filter(|n| recomputed.contains_key(n)));
            }
            groups.push(group);
        }
    }
    let row_pitch = match options.target {
        super::Target::Cpu => {
            let stored = super::storage::stored_consts(graph, &operand_transposes, &live);
            let max = options.max_buffer_bytes;
            super::storage::padded_rows(graph, &operand_transposes, &live, &stored, max)
        }
        super::Target::Gpu => BTreeMap::new(),
    };
    if fuse && options.binding_arrays {
        // Layers batch only with layers whose W is stored alike.
        batch_norms(&ctx, &mut groups, &row_pitch);
    }
    let no_chains = BTreeMap::new();
    let no_sums = BTreeMap::new();
    if fuse {
        absorb_late_epilogues(&ctx, &mut groups, &no_chains, &no_sums);
    }
    let column_sums = if fuse {
        host_column_sums(
            &ctx,
            &groups,
            &operand_transposes,
            &mut reduce_prologues,
            options,
        )
    } else {
        BTreeMap::new()
    };
    let term_chains = if fuse {
        host_term_chains(&ctx, &mut groups, &reduce_prologues, &column_sums)
    } else {
        BTreeMap::new()
    };
    if fuse && options.binding_arrays {
        batch_sums(&ctx, &mut groups, &term_chains, &column_sums);
    }
    Ok(Fusion {
        groups,
        operand_transposes,
        reduce_prologues,
        term_chains,
        row_pitch,
        column_sums,
        operand_prologues,
        unhosted,
    })
}

/// Decides the operand prologues (module docs) among the recomputations no group has taken:
/// each with the chain of recomputations that only it reads, where every live reader of the
/// value is a product anchoring a group (or a transpose read in place whose readers all are)
/// and each of those kernels still binds at most `max_bindings` buffers.
fn host_operand_prologues(
    ctx: &mut Context,
    groups: &[Vec<NodeId>],
    transposes: &BTreeSet<NodeId>,
) -> BTreeMap<NodeId, Vec<NodeId>> {
    let graph = ctx.graph;
    let anchors: HashMap<NodeId, &Vec<NodeId>> = groups.iter().map(|g| (g[0], g)).collect();
    let is_product = |n: NodeId| {
        matches!(graph.node(n).op, Op::MatMul | Op::Gemm { .. }) && anchors.contains_key(&n)
    };
    let mut prologues = BTreeMap::new();
    for &t in graph.recomputed().keys().rev() {
        if ctx.taken.contains(&t) || !ctx.live.contains(&t) {
            continue;
        }
        // The products that load `t`, directly or through a transpose read in place.
        let mut products = vec![];
        let all_products = ctx.live_consumers(t).into_iter().all(|c| {
            if transposes.contains(&c) {
                let readers = ctx.live_consumers(c);
                products.extend(readers.iter().copied());
                !readers.is_empty() && readers.iter().all(|&r| is_product(r))
            } else {
                products.push(c);
                is_product(c)
            }
        });
        if !all_products || products.is_empty() {
            continue;
        }
        // `t` and the recomputations only the chain reads, operands first.
        let mut chain = vec![t];
        let mut k = 0;
        while k < chain.len() {
            for i in graph.inputs_of(chain[k]) {
                let only_chain = ctx.live_consumers(i).iter().all(|c| chain.contains(c));
                if graph.recomputed().contains_key(&i)
                    && !ctx.taken.contains(&i)
                    && !chain.contains(&i)
                    && only_chain
                {
                    chain.push(i);
                }
            }
            k += 1;
        }
        chain.reverse();
        let shape = graph.shape(t);
        let elementwise = chain
            .iter()
            .all(|&n| is_elementwise(&graph.node(n).op) && numel(graph.shape(n)) == numel(shape));
        let fits = products.iter().all(|p| {
            let mut kernel = anchors[p].clone();
            kernel.extend(&chain);
            bindings(graph, &kernel, ctx.live, &ctx.kept) <= ctx.max_bindings
        });
        if elementwise && fits {
            ctx.taken.extend(chain.iter().copied());
            prologues.insert(t, chain);
        }
    }
    prologues
}

/// Appends each DoRA norm group to the first earlier one of the same attributes and input
/// shapes and weight storage (module docs: *layer batches*).
fn batch_norms(ctx: &Context, groups: &mut Vec<Vec<NodeId>>, pitch: &BTreeMap<NodeId, usize>) {
    let graph = ctx.graph;
    let key = |g: &[NodeId]| match &graph.node(g[0]).op {
        Op::DoraNormSq(p) => {
            let shapes: Vec<Vec<usize>> = (graph.inputs_of(g[0]).iter())
                .map(|&i| graph.shape(i).to_vec())
                .collect();
            let w = graph.inputs_of(g[0])[0];
            Some((*p, shapes, graph.stored(w), pitch.get(&w).copied()))
        }
        _ => None,
    };
    batch_layers(ctx, groups, key, |groups| groups.to_vec());
}

/// Appends each sum of column sums per tile (module docs: *column sums*) to the first earlier
/// one of the same op, tiles and shapes (module docs: *layer batches*): DoRA's magnitude
/// gradients, one per layer, then take one dispatch at the end of the backward pass.
fn batch_sums(
    ctx: &Context,
    groups: &mut Vec<Vec<NodeId>>,
    chains: &BTreeMap<NodeId, Vec<NodeId>>,
    column_sums: &BTreeMap<NodeId, ColumnSum>,
) {
    let graph = ctx.graph;
    let key = |g: &[NodeId]| {
        let node = graph.node(g[0]);
        let x = *graph.inputs_of(g[0]).first()?;
        let sum = column_sums.get(&x)?;
        let op = matches!(node.op, Op::Reduce { .. }).then(|| node.op.clone())?;
        Some((op, sum.tiles, graph.shape(x).to_vec(), node.shape.clone()))
    };
    batch_layers(ctx, groups, key, |groups| {
        kernel_members(groups, chains, column_sums)
    });
}

/// Appends each group that `key` gives a key to the first earlier one of the same key while
/// the kernel stays within `max_bindings`, each layer's anchor reads values of its own (two
/// norms of the same weights stay apart) and no kernel would then need, directly or through
/// others, a value it computes itself (`members`: each kernel's nodes, given the groups).
fn batch_layers<K: PartialEq>(
    ctx: &Context,
    groups: &mut Vec<Vec<NodeId>>,
    key: impl Fn(&[NodeId]) -> Option<K>,
    members: impl Fn(&[Vec<NodeId>]) -> Vec<Vec<NodeId>>,
) {
    let graph = ctx.graph;
    // A group that reads no kernel's value (a norm reads parameters) cannot close a cycle, so
    // two such groups merge without the whole-graph check.
    let owned: HashSet<NodeId> = members(groups).into_iter().flatten().collect();
    let reads_no_kernel = |group: &[NodeId]| {
        let mut stack: Vec<NodeId> = group.iter().flat_map(|&n| graph.inputs_of(n)).collect();
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if group.contains(&v) || !seen.insert(v) {
                continue;
            }
            if owned.contains(&v) {
                return false;
            }
            stack.extend(graph.inputs_of(v));
        }
        true
    };
    let mut g = 0;
    while g < groups.len() {
        let Some(k) = key(&groups[g]) else {
            g += 1;
            continue;
        };
        let batch = (0..g).find(|&b| {
            // Each layer binds its own operands: the anchors' (nodes of the first's op).
            let operands = |g: &[NodeId]| -> Vec<NodeId> {
                let op = std::mem::discriminant(&graph.node(g[0]).op);
                (g.iter())
                    .filter(|&&n| std::mem::discriminant(&graph.node(n).op) == op)
                    .flat_map(|&n| graph.inputs_of(n))
                    .collect()
            };
            let taken = operands(&groups[b]);
            if key(&groups[b]).as_ref() != Some(&k)
                || operands(&groups[g]).iter().any(|w| taken.contains(w))
            {
                return false;
            }
            let mut merged = groups[b].clone();
            merged.extend(&groups[g]);
            if bindings(graph, &merged, ctx.live, &ctx.kept) > ctx.max_bindings {
                return false;
            }
            if reads_no_kernel(&groups[b]) && reads_no_kernel(&groups[g]) {
                return true;
            }
            let mut kernels = groups.clone();
            kernels[b] = merged;
            kernels.remove(g);
            acyclic(&kernel_needs(graph, &members(&kernels)))
        });
        match batch {
            Some(b) => {
                let layer = groups.remove(g);
                groups[b].extend(layer);
            }
            None => g += 1,
        }
    }
}

/// Hands each sum over the rows of a matrix (or a batch of them) to the product whose kernel
/// can sum its terms per tile of rows (module docs: *column sums*), taking the terms out of
/// `prologues`. A term (a reduction prologue) qualifies when it reads a value of the product's
/// group, directly or through views, with its element count and row length, as the product's
/// output has; the product's template sums tiles ([`row_tiles`]); its other operands are loaded
/// (none is a value of the group reached through nodes without a kernel, which the kernel would
/// read as it writes it); the kernel stays within `max_bindings`; and no kernel would then need,
/// directly or through others, a value it computes itself.
fn host_column_sums(
    ctx: &Context,
    groups: &[Vec<NodeId>],
    transposed: &BTreeSet<NodeId>,
    prologues: &mut BTreeSet<NodeId>,
    options: &super::PlanOptions,
) -> BTreeMap<NodeId, ColumnSum> {
    let graph = ctx.graph;
    let no_chains = BTreeMap::new();
    let no_kernel =
        |n: NodeId| graph.node(n).op.is_view() || prologues.contains(&n) || transposed.contains(&n);
    let mut sums: BTreeMap<NodeId, ColumnSum> = BTreeMap::new();
    for sum in groups.iter().map(|g| g[0]) {
        let op = &graph.node(sum).op;
        let Op::Reduce { axes, .. } = op else {
            continue;
        };
        let x = graph.inputs_of(sum)[0];
        let shape = graph.shape(x);
        if !is_sum(op) || !over_rows(axes, shape) || !prologues.contains(&x) {
            continue;
        }
        let operands = graph.inputs_of(x);
        for product in groups {
            let anchor = product[0];
            let Some(tiles) = row_tiles(graph, anchor, options.target, options.subgroup_size)
            else {
                continue;
            };
            // The term's operands that the kernel has in registers (through views that keep
            // the flat order: a reshape between `[batch, seq, n]` and `[tokens, n]`), at the
            // same flat index as the term's element when they hold as many elements.
            let inside = |o: &NodeId| product.contains(&through_views(graph, *o));
            let alike = |n: NodeId| {
                graph.node(n).numel() == numel(shape) && graph.shape(n).last() == shape.last()
            };
            if !alike(anchor)
                || operands.iter().all(|o| !inside(o))
                || operands.iter().any(|&o| inside(&o) && !alike(o))
                || (operands.iter())
                    .any(|&o| !inside(&o) && reaches_without_kernel(graph, o, product, no_kernel))
            {
                continue;
            }
            let mut terms: Vec<NodeId> = terms_of(&sums, anchor).collect();
            terms.push(x);
            if bindings_with(graph, product, &terms, ctx.live, &ctx.kept) > ctx.max_bindings {
                continue;
            }
            let mut trial = sums.clone();
            trial.insert(
                x,
                ColumnSum {
                    product: anchor,
                    tiles,
                },
            );
            if !acyclic(&kernel_needs(
                graph,
                &kernel_members(groups, &no_chains, &trial),
            )) {
                continue;
            }
            sums = trial;
            break;
        }
    }
    for x in sums.keys() {
        prologues.remove(x);
    }
    sums
}

/// The value `n` passes on through views (reshapes, StopGradient, casts to f32: the same
/// elements in the same flat order): the first node up its inputs that is not a view.
pub(super) fn through_views(graph: &Graph, mut n: NodeId) -> NodeId {
    while graph.node(n).op.is_view() {
        n = graph.inputs_of(n)[0];
    }
    n
}

/// True when a sum over `axes` of a tensor of `shape` adds up its rows: every axis but the last
/// (a matrix's rows, or a batch of them: the tokens of `[batch, seq, features]`).
pub(super) fn over_rows(axes: &[usize], shape: &[usize]) -> bool {
    shape.len() >= 2 && axes.iter().copied().eq(0..shape.len() - 1)
}

/// True when `v` is a node of `group`, or is reached from one through nodes that no kernel
/// computes (`no_kernel`: views, transposes read in place, reduction prologues): a kernel
/// computing `group` could read it only from memory it writes itself.
fn reaches_without_kernel(
    graph: &Graph,
    v: NodeId,
    group: &[NodeId],
    no_kernel: impl Fn(NodeId) -> bool,
) -> bool {
    let mut stack = vec![v];
    let mut seen = HashSet::new();
    while let Some(n) = stack.pop() {
        if group.contains(&n) {
            return true;
        }
        if seen.insert(n) && no_kernel(n) {
            stack.extend(graph.inputs_of(n));
        }
    }
    false
}

/// Moves each element-wise group that a sum's kernel can compute beside its terms (module docs)
/// out of `groups`, into the returned map from the sum's anchor to the chain. A sum takes at
/// most one chain, and only while the kernel stays within `max_bindings` and no kernel would
/// then need, directly or through others, a value it computes itself.
fn host_term_chains(
    ctx: &Context,
    groups: &mut Vec<Vec<NodeId>>,
    prologues: &BTreeSet<NodeId>,
    column_sums: &BTreeMap<NodeId, ColumnSum>,
) -> BTreeMap<NodeId, Vec<NodeId>> {
    let graph = ctx.graph;
    let mut chains: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
    let mut hosted = vec![false; groups.len()];
    for c in 0..groups.len() {
        let chain = &groups[c];
        if !is_elementwise(&graph.node(chain[0]).op) {
            continue;
        }
        for h in 0..groups.len() {
            let host = &groups[h];
            // A sum of column sums loads them, not the terms a chain would share.
            let sums_tiles =
                (graph.inputs_of(host[0]).first()).is_some_and(|x| column_sums.contains_key(x));
            if hosted[h]
                || chains.contains_key(&host[0])
                || sums_tiles
                || !can_host(ctx, host, chain, prologues)
            {
                continue;
            }
            // The kernels as they are, the chain apart: neither it nor the sum may read the
            // other's values (the chain runs as the terms load, the sum's epilogue after them).
            let mut kernels: Vec<Vec<NodeId>> = groups
                .iter()
                .enumerate()
                .filter(|&(g, _)| !hosted[g])
                .map(|(_, nodes)| {
                    let mut k = nodes.clone();
                    k.extend(chains.get(&nodes[0]).into_iter().flatten());
                    k.extend(terms_of(column_sums, nodes[0]));
                    k
                })
                .collect();
            let at = |g: usize| (0..g).filter(|&o| !hosted[o]).count();
            let (hk, ck) = (at(h), at(c));
            let needs = kernel_needs(graph, &kernels);
            if needs[hk].contains(&ck) || needs[ck].contains(&hk) {
                continue;
            }
            // Merged, no kernel may need, through others, a value it computes itself.
            let moved = std::mem::take(&mut kernels[ck]);
            kernels[hk].extend(moved);
            kernels.remove(ck);
            if !acyclic(&kernel_needs(graph, &kernels)) {
                continue;
            }
            chains.insert(host[0], chain.clone());
            hosted[c] = true;
            break;
        }
    }
    let mut index = 0;
    groups.retain(|_| {
        index += 1;
        !hosted[index - 1]
    });
    chains
}

/// Appends each element-wise group whose first node reads the value of another kernel of its
/// element count to that kernel's end (module docs: *late epilogues*), while the kernel stays
/// within `max_bindings` and no kernel would then need, directly or through others, a value it
/// computes itself.
fn absorb_late_epilogues(
    ctx: &Context,
    groups: &mut Vec<Vec<NodeId>>,
    chains: &BTreeMap<NodeId, Vec<NodeId>>,
    column_sums: &BTreeMap<NodeId, ColumnSum>,
) {
    let graph = ctx.graph;
    let kernels = |groups: &[Vec<NodeId>]| kernel_members(groups, chains, column_sums);
    let mut owner: HashMap<NodeId, usize> = (kernels(groups).iter().enumerate())
        .flat_map(|(k, nodes)| nodes.iter().map(move |&n| (n, k)))
        .collect();
    // The kernels whose values `n` reads, through nodes no kernel computes.
    let needs_of = |n: NodeId, owner: &HashMap<NodeId, usize>| {
        let mut needs = BTreeSet::new();
        let mut stack = graph.inputs_of(n);
        let mut seen = HashSet::new();
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            match owner.get(&v) {
                Some(&k) => {
                    needs.insert(k);
                }
                None => stack.extend(graph.inputs_of(v)),
            }
        }
        needs
    };
    let mut absorbed = vec![false; groups.len()];
    for c in 0..groups.len() {
        let chain = groups[c].clone();
        let numel_of = |n: NodeId| graph.node(n).numel();
        if chains.contains_key(&chain[0])
            || !chain.iter().all(|&n| is_elementwise(&graph.node(n).op))
            || !chain.iter().all(|&n| numel_of(n) == numel_of(chain[0]))
        {
            continue;
        }
        let mut needs: BTreeSet<usize> = BTreeSet::new();
        for &n in &chain {
            needs.extend(needs_of(n, &owner).into_iter().filter(|&k| k != c));
        }
        let n = chain[0];
        // The host computes the value `n` reads, or one that views pass on to it (a reshape
        // between `[batch, seq, n]` and `[tokens, n]`): the views then join the kernel too,
        // passing the value on in registers.
        let host = graph.inputs_of(n).into_iter().find_map(|i| {
            let source = through_views(graph, i);
            let &p = owner.get(&source)?;
            let anchor = graph.node(groups[p][0]);
            let mut views = vec![];
            let mut v = i;
            while v != source {
                views.push(v);
                v = graph.inputs_of(v)[0];
            }
            views.reverse();
            let hosts = !absorbed[p]
                && p != c
                && takes_epilogue(&anchor.op)
                && !matches!(anchor.op, Op::DoraNormSq(_))
                && !chains.contains_key(&groups[p][0])
                && anchor.numel() == numel_of(n)
                && views
                    .iter()
                    .all(|v| !owner.contains_key(v) || groups[p].contains(v));
            hosts.then_some((p, views))
        });
        let Some((p, views)) = host else {
            continue;
        };
        let mut trial = groups[p].clone();
        trial.extend(views.iter().filter(|v| !groups[p].contains(v)));
        trial.extend(&chain);
        let terms: Vec<NodeId> = terms_of(column_sums, trial[0]).collect();
        if bindings_with(graph, &trial, &terms, ctx.live, &ctx.kept) > ctx.max_bindings {
            continue;
        }
        // Reading nothing computed but the host's values, it cannot close a cycle.
        if needs.iter().any(|&k| k != p) {
            let mut all = groups.clone();
            all[p] = trial.clone();
            let live: Vec<Vec<NodeId>> = (0..all.len())
                .filter(|&k| k != c && !absorbed[k])
                .map(|k| all[k].clone())
                .collect();
            if !acyclic(&kernel_needs(graph, &kernels(&live))) {
                continue;
            }
        }
        for &n in trial[groups[p].len()..].iter() {
            owner.insert(n, p);
        }
        groups[p] = trial;
        groups[c].clear();
        absorbed[c] = true;
    }
    groups.retain(|g| !g.is_empty());
}

/// True when the sum anchoring `host` can compute `chain` beside its terms: a sum of at least
/// [`TERM_CHAIN_MIN_SUMS`] outputs whose reduced tensor has the shape of the chain's first
/// node, which reads an operand of the same shape that the sum loads too (its input, or an
/// input of its prologue); every chain member keeps that element count; and the kernel binds
/// at most `max_bindings` buffers.
fn can_host(
    ctx: &Context,
    host: &[NodeId],
    chain: &[NodeId],
    prologues: &BTreeSet<NodeId>,
) -> bool {
    let graph = ctx.graph;
    let anchor = graph.node(host[0]);
    if !super::kernels::is_sum(&anchor.op) || anchor.numel() < TERM_CHAIN_MIN_SUMS {
        return false;
    }
    let x = graph.inputs_of(host[0])[0];
    let x_shape = graph.shape(x);
    let loaded: Vec<NodeId> = if prologues.contains(&x) {
        graph.inputs_of(x)
    } else {
        vec![x]
    };
    let shares_a_load = graph
        .inputs_of(chain[0])
        .iter()
        .any(|i| loaded.contains(i) && graph.shape(*i) == x_shape);
    if graph.shape(chain[0]) != x_shape
        || !shares_a_load
        || chain
            .iter()
            .any(|&n| numel(graph.shape(n)) != numel(x_shape))
    {
        return false;
    }
    // The host's bindings, then what the chain adds: the values it reads that the host does not
    // bind, its last value and the interior values read outside it.
    let mut bound: HashSet<NodeId> = host
        .iter()
        .flat_map(|&n| graph.inputs_of(n))
        .filter(|i| !host.contains(i))
        .collect();
    bound.extend(&loaded);
    let inside: HashSet<NodeId> = chain.iter().copied().collect();
    let reads: HashSet<NodeId> = chain
        .iter()
        .flat_map(|&n| graph.inputs_of(n))
        .filter(|i| !inside.contains(i) && !bound.contains(i))
        .collect();
    let total = bindings(graph, host, ctx.live, &ctx.kept)
        + reads.len()
        + 1
        + escaping(graph, chain, ctx.live, &ctx.kept).len();
    total <= ctx.max_bindings
}

/// For each kernel (the nodes it computes), the kernels computing the values it reads. Values
/// no kernel computes (inputs, views, transposes read in place, prologues) are followed to the
/// kernels computing their sources.
pub(super) fn kernel_needs(graph: &Graph, kernels: &[Vec<NodeId>]) -> Vec<BTreeSet<usize>> {
    let owner: HashMap<NodeId, usize> = kernels
        .iter()
        .enumerate()
        .flat_map(|(k, nodes)| nodes.iter().map(move |&n| (n, k)))
        .collect();
    kernels
        .iter()
        .enumerate()
        .map(|(k, nodes)| {
            let mut needs = BTreeSet::new();
            let mut stack: Vec<NodeId> = nodes.iter().flat_map(|&n| graph.inputs_of(n)).collect();
            let mut seen = HashSet::new();
            while let Some(v) = stack.pop() {
                if !seen.insert(v) {
                    continue;
                }
                match owner.get(&v) {
                    Some(&o) if o != k => {
                        needs.insert(o);
                    }
                    Some(_) => {}
                    None => stack.extend(graph.inputs_of(v)),
                }
            }
            needs
        })
        .collect()
}

/// For each kernel, the kernels that read its values: [`kernel_needs`] turned round.
pub(super) fn readers(needs: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    let mut readers: Vec<Vec<usize>> = vec![vec![]; needs.len()];
    for (k, ns) in needs.iter().enumerate() {
        for &n in ns {
            readers[n].push(k);
        }
    }
    readers
}

/// The kernels in an order where each comes after those it needs, as far as there is one: a
/// kernel on a cycle, or needing one on a cycle, is left out.
pub(super) fn topological(needs: &[BTreeSet<usize>], readers: &[Vec<usize>]) -> Vec<usize> {
    let mut waiting: Vec<usize> = needs.iter().map(BTreeSet::len).collect();
    let mut ready: Vec<usize> = (0..needs.len()).filter(|&k| waiting[k] == 0).collect();
    let mut order = Vec::with_capacity(needs.len());
    while let Some(k) = ready.pop() {
        order.push(k);
        for &r in &readers[k] {
            waiting[r] -= 1;
            if waiting[r] == 0 {
                ready.push(r);
            }
        }
    }
    order
}

/// True when kernels with these needs ([`kernel_needs`]) can run in an order where each runs
/// after those it needs.
fn acyclic(needs: &[BTreeSet<usize>]) -> bool {
    topological(needs, &readers(needs)).len() == needs.len()
}

/// Values that must reach memory whatever their consumers: graph outputs and the `next` values
/// of state updates.
pub fn kept(graph: &Graph) -> HashSet<NodeId> {
    (graph.outputs().iter().map(|&(_, n)| n))
        .chain(graph.updates().iter().map(|&(_, next)| next))
        .collect()
}

/// The interior nodes of `group` whose values are needed outside it (kept, or read by a live
/// node of another group, directly or through a view in the group): its kernel writes them
/// beside its output. A view in the group has no value of its own to write: its source does.
pub fn escaping(
    graph: &Graph,
    group: &[NodeId],
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
) -> Vec<NodeId> {
    escaping_with(graph, group, &[], live, kept)
}

/// [`escaping`] for a kernel that also computes `terms` (that it sums over its tiles of rows):
/// a value they alone read stays in registers.
pub fn escaping_with(
    graph: &Graph,
    group: &[NodeId],
    terms: &[NodeId],
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
) -> Vec<NodeId> {
    let read_outside = |n: NodeId| {
        kept.contains(&n)
            || (graph.consumers(n).iter())
                .any(|c| live.contains(c) && !group.contains(c) && !terms.contains(c))
    };
    // A value is read outside also when a chain of views of it in the group is (a transpose's
    // gradient reshaped twice, say).
    fn seen_outside(
        graph: &Graph,
        group: &[NodeId],
        n: NodeId,
        read_outside: &dyn Fn(NodeId) -> bool,
    ) -> bool {
        read_outside(n)
            || graph.consumers(n).iter().any(|&v| {
                group.contains(&v)
                    && graph.node(v).op.is_view()
                    && seen_outside(graph, group, v, read_outside)
            })
    }
    group[..group.len() - 1]
        .iter()
        .copied()
        .filter(|&n| !graph.node(n).op.is_view() && seen_outside(graph, group, n, &read_outside))
        .collect()
}

/// True when `n` can be computed by the reduction that reads it (module docs): an element-wise
/// node of at most `max_bindings` - 2 inputs (the reduction binds them and its output),
/// neither kept nor an index map, whose only live reader is a reduction (its one input).
pub fn is_reduce_prologue(
    graph: &Graph,
    n: NodeId,
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
    max_bindings: usize,
) -> bool {
    let op = &graph.node(n).op;
    let readers: Vec<NodeId> = graph
        .consumers(n)
        .into_iter()
        .filter(|c| live.contains(c))
        .collect();
    is_elementwise(op)
        && has_kernel(op)
        && !kept.contains(&n)
        && graph.inputs_of(n).len() + 2 <= max_bindings
        && matches!(readers.as_slice(), [r] if matches!(graph.node(*r).op, Op::Reduce { .. }))
}

/// The transposes whose readers can all index their source in place (see
/// [`readable_in_place`]) and whose value is not kept.
pub fn operand_transposes(
    graph: &Graph,
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
) -> BTreeSet<NodeId> {
    live.iter()
        .copied()
        .filter(|&t| !kept.contains(&t) && readable_in_place(graph, t, live))
        .collect()
}

/// True when `t` is a transpose of rank >= 2 with live readers, each a MatMul/Gemm reading it
/// as A or B or an element-wise op: kernels that can read it through permuted strides.
pub fn readable_in_place(graph: &Graph, t: NodeId, live: &BTreeSet<NodeId>) -> bool {
    if !matches!(graph.node(t).op, Op::Transpose { .. }) || graph.shape(t).len() < 2 {
        return false;
    }
    let readers: Vec<NodeId> = graph
        .consumers(t)
        .into_iter()
        .filter(|c| live.contains(c))
        .collect();
    !readers.is_empty() && readers.iter().all(|&c| reads_in_place(graph, c, t))
}

/// True when `reader` can read the value `t` through a transpose of it by indexing `t`'s
/// memory: a matrix product (a Gemm's A or B, not its C) or an element-wise kernel.
pub fn reads_in_place(graph: &Graph, reader: NodeId, t: NodeId) -> bool {
    match &graph.node(reader).op {
        Op::MatMul => true,
        Op::Gemm { .. } => graph.inputs_of(reader).get(2) != Some(&t),
        op => is_elementwise(op) && has_kernel(op),
    }
}

struct Context<'a> {
    graph: &'a Graph,
    live: &'a BTreeSet<NodeId>,
    /// Values that must reach memory whatever their consumers: outputs and state `next` values.
    kept: HashSet<NodeId>,
    /// Nodes already in a group, or read in place.
    taken: HashSet<NodeId>,
    /// Schedule positions: a group runs where its last node is scheduled.
    position: std::collections::HashMap<NodeId, usize>,
    /// Storage buffers a kernel may bind.
    max_bindings: usize,
}

impl Context<'_> {
    fn live_consumers(&self, n: NodeId) -> Vec<NodeId> {
        self.graph
            .consumers(n)
            .into_iter()
            .filter(|c| self.live.contains(c))
            .collect()
    }

    /// Element-wise, computed by a kernel, of `shape`, and in no group yet.
    fn free_elementwise(&self, n: NodeId, shape: &[usize]) -> bool {
        let node = self.graph.node(n);
        !self.taken.contains(&n)
            && self.live.contains(&n)
            && is_elementwise(&node.op)
            && has_kernel(&node.op)
            && numel(&node.shape) == numel(shape)
    }

    /// Extends `group` by epilogue consumers and their side operands (module docs).
    fn grow(&mut self, group: &mut Vec<NodeId>) {
        let shape = self.graph.shape(group[0]).to_vec();
        loop {
            let last = *group.last().expect("groups are not empty");
            let Some((view, next, others)) = self.epilogue_candidate(last, &shape) else {
                return;
            };
            let mut joining = vec![];
            let mut inside: HashSet<NodeId> = group.iter().copied().collect();
            // A same-shape view (DoRA's StopGradient) passes the value on in registers.
            if let Some(view) = view {
                joining.push(view);
                inside.insert(view);
            }
            if !self.free_elementwise(next, &shape) || self.larger_product_reads(next, group) {
                return;
            }
            // Where the group's value must reach memory anyway (it is shared or kept), a reader
            // that its one reader, a reduction, can compute as it loads (a reduction prologue)
            // is better left to it: joining would give it a buffer and save no kernel.
            let escapes = !others.is_empty() || self.kept.contains(&last);
            if escapes
                && is_reduce_prologue(self.graph, next, self.live, &self.kept, self.max_bindings)
            {
                return;
            }
            let views = joining.len();
            self.side_operands(next, &shape, &mut inside, &mut joining);
            joining.push(next);
            let mut trial = group.clone();
            trial.extend(&joining);
            if !self.fits(&trial) {
                // Without the side operands, the consumer alone may still fit.
                let mut alone = group.clone();
                alone.extend(&joining[..views]);
                alone.push(next);
                if !self.fits(&alone) {
                    return;
                }
                trial = alone;
            }
            for &n in &trial[group.len()..] {
                self.taken.insert(n);
            }
            *group = trial;
        }
    }

    /// The starts of the groups that sum two products (`product_sums`), by their anchor, the
    /// product of more multiply-adds, in schedule order; their nodes are taken.
    fn product_sums(&mut self, order: &[NodeId]) -> HashMap<NodeId, Vec<NodeId>> {
        let mut sums = HashMap::new();
        for &p1 in order {
            if !product_sums::is_product(self.graph, p1)
                || !self.live.contains(&p1)
                || self.taken.contains(&p1)
            {
                continue;
            }
            let free = |n: NodeId| !self.taken.contains(&n) && self.live.contains(&n);
            let seed = product_sums::seed(self.graph, p1, self.live, &self.kept, free);
            if let Some(seed) = seed.filter(|seed| self.fits(seed)) {
                self.taken.extend(seed.iter().copied());
                sums.insert(p1, seed);
            }
        }
        sums
    }

    /// Puts before `group`'s one node, an element-wise anchor, the recomputations it reads
    /// that no kernel computes yet (and theirs), where the kernel still fits.
    fn recomputed_operands(&mut self, group: &mut Vec<NodeId>) {
        let anchor = group[0];
        let shape = self.graph.shape(anchor).to_vec();
        let mut inside: HashSet<NodeId> = [anchor].into();
        let mut joining = vec![];
        self.side_operands(anchor, &shape, &mut inside, &mut joining);
        joining.retain(|n| self.graph.recomputed().contains_key(n));
        if joining.is_empty() {
            return;
        }
        joining.push(anchor);
        if self.fits(&joining) {
            self.taken.extend(joining.iter().copied());
            *group = joining;
        }
    }

    /// True when `n` also reads the value of a product that no group has taken yet and that
    /// does more multiply-adds than `group`'s anchor: `n` is left to that product's epilogue.
    /// A layer's backward adds the low-rank path's `dx` to the base product's; in the larger
    /// kernel the add costs a load per output, in the smaller one it costs that and the larger
    /// product's whole output written and read back.
    fn larger_product_reads(&self, n: NodeId, group: &[NodeId]) -> bool {
        let own = product_sums::work(self.graph, group[0]).unwrap_or(0);
        self.graph.inputs_of(n).into_iter().any(|o| {
            !group.contains(&o)
                && !self.taken.contains(&o)
                && self.live.contains(&o)
                && product_sums::work(self.graph, o).is_some_and(|w| w > own)
        })
    }

    /// True when `group` binds at most `max_bindings` buffers and its kernel, which runs where
    /// its last node is scheduled, runs before every reader outside it of a value it computes
    /// (those read the value from memory, so it must be written by then). A value read by
    /// several nodes of the group (AdamW's gradient, read by both moments) stays in registers.
    fn fits(&self, group: &[NodeId]) -> bool {
        if bindings(self.graph, group, self.live, &self.kept) > self.max_bindings {
            return false;
        }
        let inside: HashSet<NodeId> = group.iter().copied().collect();
        let runs_at = group.iter().map(|n| self.position[n]).max().unwrap_or(0);
        group
            .iter()
            .flat_map(|&n| self.live_consumers(n))
            .filter(|c| !inside.contains(c))
            .all(|c| self.position[&c] > runs_at)
    }

    /// The consumer of `v` that may continue its group as an epilogue (the earliest scheduled
    /// live consumer of the group's shape that is free), the other live consumers, which will
    /// read `v` from memory, and the view the value passes through on its way when `v`'s one
    /// consumer is a same-shape view (DoRA's StopGradient). None when nothing can continue.
    fn epilogue_candidate(
        &self,
        v: NodeId,
        shape: &[usize],
    ) -> Option<(Option<NodeId>, NodeId, Vec<NodeId>)> {
        let sorted = |n: NodeId| {
            let mut c = self.live_consumers(n);
            c.sort_by_key(|c| self.position[c]);
            c
        };
        let recomputed = self.graph.recomputed();
        let split = |consumers: Vec<NodeId>| {
            let next = match consumers.as_slice() {
                [] => return None,
                // A recomputation belongs to the kernel of its backward reader, not here.
                [only] if !recomputed.contains_key(only) => *only,
                [_] => return None,
                many => *many
                    .iter()
                    .find(|&&c| self.free_elementwise(c, shape) && !recomputed.contains_key(&c))?,
            };
            let others = consumers.into_iter().filter(|&c| c != next).collect();
            Some((next, others))
        };
        let consumers = sorted(v);
        if let &[view] = consumers.as_slice() {
            let node = self.graph.node(view);
            if node.op.is_view()
                && numel(&node.shape) == numel(shape)
                && !self.kept.contains(&view)
                && !self.taken.contains(&view)
            {
                let (next, others) = split(sorted(view))?;
                return Some((Some(view), next, others));
            }
        }
        let (next, others) = split(consumers)?;
        Some((None, next, others))
    }

    /// Appends to `out`, operands before their readers, the side operands of `n` that may join
    /// its group: free element-wise values of `shape` read by `n` alone.
    fn side_operands(
        &self,
        n: NodeId,
        shape: &[usize],
        inside: &mut HashSet<NodeId>,
        out: &mut Vec<NodeId>,
    ) {
        for o in self.graph.inputs_of(n) {
            // A recomputation joins its first reader's kernel, which writes it for the others
            // (none of them in the kernel already: those would read it before it is computed).
            let readers = self.live_consumers(o);
            let shared = if self.graph.recomputed().contains_key(&o) {
                readers.iter().any(|c| c != &n && inside.contains(c))
            } else {
                readers != [n]
            };
            if inside.contains(&o) || !self.free_elementwise(o, shape) || shared {
                continue;
            }
            inside.insert(o);
            self.side_operands(o, shape, inside, out);
            out.push(o);
        }
    }
}

/// Storage buffers a kernel computing `group` binds: one per operand slot of the anchor (the
/// anchors' emitters bind each slot), one per other distinct value read from outside the group
/// (the epilogue shares a binding between loads of the same value), the output, and one per
/// interior value it writes for readers outside it.
fn bindings(
    graph: &Graph,
    group: &[NodeId],
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
) -> usize {
    bindings_with(graph, group, &[], live, kept)
}

/// [`bindings`] of a kernel that also sums `terms` over its tiles of rows: each binds the
/// operands the group does not compute or bind, and a buffer for its sums.
fn bindings_with(
    graph: &Graph,
    group: &[NodeId],
    terms: &[NodeId],
    live: &BTreeSet<NodeId>,
    kept: &HashSet<NodeId>,
) -> usize {
    let anchor_slots = graph.inputs_of(group[0]);
    // A reduction may compute its input as a prologue (decided after its group grows), binding
    // that input's operands instead of it: count them.
    let prologue_slots = match (&graph.node(group[0]).op, anchor_slots.as_slice()) {
        (Op::Reduce { .. }, &[x]) if is_elementwise(&graph.node(x).op) => {
            graph.inputs_of(x).len().saturating_sub(1)
        }
        _ => 0,
    };
    // The second product of a sum binds each of its operand slots too.
    let second_slots = match group.get(1) {
        Some(&p2)
            if product_sums::is_product(graph, group[0]) && product_sums::is_product(graph, p2) =>
        {
            graph.inputs_of(p2)
        }
        _ => vec![],
    };
    let inside: HashSet<NodeId> = group.iter().copied().collect();
    let others: HashSet<NodeId> = (group[1..].iter().chain(terms))
        .flat_map(|&n| graph.inputs_of(n))
        .filter(|i| !inside.contains(i) && !anchor_slots.contains(i) && !second_slots.contains(i))
        .collect();
    anchor_slots.len()
        + second_slots.len()
        + prologue_slots
        + others.len()
        + 1
        + escaping_with(graph, group, terms, live, kept).len()
        + terms.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{unary, Binary, GraphBuilder};
    use crate::tensor::Tensor;

    /// x @ w + bias -> relu -> * scale, where `scale` is computed before or after the matmul.
    fn chain(scale_first: bool) -> (GraphBuilder, Vec<NodeId>) {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![3, 4]);
        let w = g.add_const("w", Tensor::f32(vec![4, 5], vec![0.5; 20]));
        let bias = g.add_const("bias", Tensor::f32(vec![5], vec![1.0; 5]));
        let s_in = g.add_input("s", vec![3, 5]);
        let early = g.add(Op::Unary(unary::EXP), &[s_in], "early", "early");
        let early = early.unwrap();
        let mm = g.add(Op::MatMul, &[x, w], "mm", "mm").unwrap();
        let late = g.add(Op::Unary(unary::EXP), &[s_in], "late", "late");
        let late = late.unwrap();
        let add = g.add(Op::Binary(Binary::Add), &[mm, bias], "add", "add");
        let add = add.unwrap();
        let relu = g
            .add(Op::Unary(unary::RELU), &[add], "relu", "relu")
            .unwrap();
        let scale = if scale_first { early } else { late };
        let y = g.add(Op::Binary(Binary::Mul), &[relu, scale], "y", "y");
        let y = y.unwrap();
        g.add_output("y", y);
        let other = if scale_first { late } else { early };
        g.add_output("other", other);
        (g, vec![mm, add, relu, y, early, late])
    }

    /// A portable plan's options, fused or not.
    fn options(fuse: bool) -> crate::codegen::PlanOptions {
        crate::codegen::PlanOptions {
            fuse,
            ..Default::default()
        }
    }

    fn groups(g: &Graph, fuse: bool) -> Vec<Vec<NodeId>> {
        decide(g, &options(fuse)).unwrap().groups
    }

    #[test]
    fn chains_fuse_whenever_their_other_inputs_are_computed() {
        // The scale (read by the Mul alone, of the anchor's shape) joins as a side operand,
        // whether it is scheduled before the matmul or after it: the kernel runs where its
        // last node is scheduled. The other exp is an output and keeps its own kernel.
        let (g, n) = chain(true);
        let gr = groups(&g, true);
        assert_eq!(gr, vec![vec![n[0], n[1], n[2], n[4], n[3]], vec![n[5]]]);
        let (g, n) = chain(false);
        let gr = groups(&g, true);
        assert_eq!(gr, vec![vec![n[0], n[1], n[2], n[5], n[3]], vec![n[4]]]);
        let unfused = groups(&g, false);
        assert!(unfused.iter().all(|g| g.len() == 1), "{unfused:?}");
    }

    #[test]
    fn side_operands_read_by_the_epilogue_alone_join_it() {
        // m' = 0.9 m + 0.1 g: `0.9 m` starts early, `0.1 g` after g's matmul; one kernel.
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![3, 4]);
        let w = g.add_input("w", vec![4, 5]);
        let m = g.add_input("m", vec![3, 5]);
        let c = |g: &mut GraphBuilder, v: f32, name: &str| g.add_const(name, Tensor::scalar(v));
        let b1 = c(&mut g, 0.9, "b1");
        let decay = g
            .add(Op::Binary(Binary::Mul), &[m, b1], "decay", "decay")
            .unwrap();
        let grad = g.add(Op::MatMul, &[x, w], "grad", "grad").unwrap();
        let b2 = c(&mut g, 0.1, "b2");
        let scaled = g
            .add(Op::Binary(Binary::Mul), &[grad, b2], "gs", "gs")
            .unwrap();
        let next = g.add(Op::Binary(Binary::Add), &[decay, scaled], "next", "next");
        let next = next.unwrap();
        g.add_output("next", next);
        let gr = groups(&g, true);
        assert_eq!(gr, vec![vec![grad, scaled, decay, next]]);
        // Kept (a graph output), it still joins, and the kernel writes it beside its output.
        g.add_output("decay", decay);
        let gr = groups(&g, true);
        assert_eq!(gr, vec![vec![grad, scaled, decay, next]]);
        // Read by another node too, it keeps a kernel of its own.
        let other = g.add(Op::Unary(unary::EXP), &[decay], "other", "other");
        g.add_output("other", other.unwrap());
        let gr = groups(&g, true);
        assert!(gr.contains(&vec![grad, scaled, next]), "{gr:?}");
        assert!(gr.iter().any(|g| g[0] == decay), "{gr:?}");
    }

    #[test]
    fn a_value_read_twice_inside_the_group_stays_in_registers() {
        // AdamW's shape: g = x @ w; m' = 0.9 m + 0.1 g; v' = 0.9 v + 0.1 g * g; y = m' / v'.
        // Both moments read g, and the chain through m' takes v' as a side operand: one kernel,
        // and g, read only inside it, gets no buffer.
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![3, 4]);
        let w = g.add_input("w", vec![4, 5]);
        let m = g.add_input("m", vec![3, 5]);
        let v = g.add_input("v", vec![3, 5]);
        let c = g.add_const("c", Tensor::scalar(0.9));
        let op = |g: &mut GraphBuilder, b: Binary, ins: &[NodeId], name: &str| {
            g.add(Op::Binary(b), ins, name, name).unwrap()
        };
        let grad = g.add(Op::MatMul, &[x, w], "grad", "grad").unwrap();
        let gm = op(&mut g, Binary::Mul, &[grad, c], "gm");
        let md = op(&mut g, Binary::Mul, &[m, c], "md");
        let m2 = op(&mut g, Binary::Add, &[md, gm], "m2");
        let sq = op(&mut g, Binary::Mul, &[grad, grad], "sq");
        let vd = op(&mut g, Binary::Mul, &[v, c], "vd");
        let v2 = op(&mut g, Binary::Add, &[vd, sq], "v2");
        let y = op(&mut g, Binary::Div, &[m2, v2], "y");
        g.add_output("y", y);
        g.add_output("v2", v2);
        let graph = g.finish();
        let fusion = decide(&graph, &options(true)).unwrap();
        assert_eq!(fusion.groups.len(), 1, "{:?}", fusion.groups);
        let group = &fusion.groups[0];
        assert_eq!(group.len(), 8, "{group:?}");
        let live = schedule::live(&graph);
        let written = escaping(&graph, group, &live, &kept(&graph));
        assert_eq!(written, vec![v2], "{group:?}");
    }

    #[test]
    fn transposes_read_by_matmuls_and_elementwise_ops_need_no_kernel() {
        let mut g = GraphBuilder::new();
        let x = g.add_input("x", vec![3, 4]);
        let a = g.add_input("a", vec![5, 4]);
        let t = g.add(Op::Transpose { perm: vec![1, 0] }, &[a], "a_t", "a_t");
        let t = t.unwrap();
        let y = g.add(Op::MatMul, &[x, t], "y", "y").unwrap();
        let z = g.add(Op::Unary(unary::EXP), &[t], "z", "z").unwrap();
        g.add_output("y", y);
        g.add_output("z", z);
        let f = decide(&g, &options(true)).unwrap();
        assert_eq!(f.operand_transposes, [t].into());
        assert_eq!(f.groups, vec![vec![y], vec![z]]);
        // A reduction cannot read it in place; nor can anyone when it is an output.
        let s = g.add(
            Op::Reduce {
                kind: crate::ir::Reduce::Sum,
                axes: vec![0],
                keepdims: false,
            },
            &[t],
            "s",
            "s",
        );
        g.add_output("s", s.unwrap());
        assert!(decide(&g, &options(true))
            .unwrap()
            .operand_transposes
            .is_empty());
        assert!(decide(&g, &options(false))
            .unwrap()
            .operand_transposes
            .is_empty());
    }

    /// The group's interior values that its kernel writes for readers outside it.
    fn written(g: &Graph, group: &[NodeId]) -> Vec<NodeId> {
        escaping(g, group, &schedule::live(g), &kept(g))
    }

    #[test]
    fn kept_and_shared_values_are_written_beside_the_output() {
        // A graph output in the middle: the chain goes on, its kernel writes the output too.
        let (mut g, n) = chain(true);
        g.add_output("mid", n[1]);
        let gr = groups(&g, true);
        assert_eq!(gr[0], vec![n[0], n[1], n[2], n[4], n[3]], "{gr:?}");
        assert_eq!(written(&g, &gr[0]), [n[1]]);
        // A state's next value in the middle.
        let (mut g, n) = chain(true);
        let state = g.add_input("state", vec![3, 5]);
        g.add_update(state, n[2]);
        let gr = groups(&g, true);
        assert_eq!(gr[0], vec![n[0], n[1], n[2], n[4], n[3]], "{gr:?}");
        assert_eq!(written(&g, &gr[0]), [n[2]]);
        // A value with a second, element-wise reader that the schedule puts after the group's
        // last node: `grow` leaves it, and it joins the kernel's end as a late epilogue (the
        // kernel then writes `y` beside it, and `add` stays in registers).
        let (mut g, n) = chain(true);
        let neg = g.add(Op::Unary(unary::NEG), &[n[1]], "neg", "neg").unwrap();
        g.add_output("neg", neg);
        let gr = groups(&g, true);
        let first = gr.iter().find(|k| k[0] == n[0]).unwrap();
        assert!(first.starts_with(&[n[0], n[1]]), "{gr:?}");
        assert_eq!(first.last(), Some(&neg), "{gr:?}");
        assert_eq!(written(&g, first), [n[3]], "{gr:?}");
        // A reader of another element count cannot join: the value is written and read back.
        let (mut g, n) = chain(true);
        let wide = g.add_input("wide", vec![2, 3, 5]);
        let sum = g.add(Op::Binary(Binary::Add), &[n[1], wide], "sum", "sum");
        g.add_output("sum", sum.unwrap());
        let gr = groups(&g, true);
        let first = gr.iter().find(|k| k[0] == n[0]).unwrap();
        assert_eq!(written(&g, first), [n[1]], "{gr:?}");
    }
}
