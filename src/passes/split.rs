//! Constants larger than one storage binding, split into chunks that each fit.
//!
//! A device binds at most `max_storage_buffer_binding_size` bytes per buffer (128 MiB on
//! lavapipe), less than GPT-2 small's token embedding (50257 x 768 f32, 154 MB). Each op that
//! reads such a constant is rewritten over chunks of it, with ops dorac already has, so the
//! reference executor, the kernels and autodiff need nothing new:
//!
//! - **Gather** of rows (an embedding): one Gather per chunk of rows with the ids shifted into
//!   that chunk, summed. An id outside a chunk reads as 0 there (Gather's rule for out-of-range
//!   ids), so exactly one chunk contributes each row.
//! - **MatMul** `x @ W` (a tied LM head): W split along its output columns, one product per
//!   chunk, concatenated along the last axis. W on the left is split along its rows.
//! - **Gemm** likewise along N (transposed or not), with its C split when it has N columns.
//!
//! Any other reader of an oversized constant is an error naming the tensor. Splits along rows of
//! a memory-mapped weight stay mapped (no copy); column splits are copied.
//!
//! [`split_large_constants`] serves inference and frozen weights: each reader gets its own
//! chunks. A trainable tensor must stay one set of parameters, so [`split_parameter`] cuts it
//! once, into chunks all its readers share, which training then updates one by one.

use crate::error::{Error, Result};
use crate::ir::op::MAX_CONCAT_INPUTS;
use crate::ir::{rewrite, Binary, BlockCodes, Graph, NodeId, Op, Patch, PatchOps, PatchRef, Rule};
use crate::tensor::{shape_str, DType, Tensor};

/// The constants of `graph` over `max_bytes`.
fn oversized(graph: &Graph, max_bytes: u64) -> Vec<NodeId> {
    graph
        .petgraph()
        .node_indices()
        .filter(|&n| matches!(graph.node(n).op, Op::Const(_)) && bytes(graph.shape(n)) > max_bytes)
        .collect()
}

/// Whether some constant of `graph` is over `max_bytes`.
pub fn needs_split(graph: &Graph, max_bytes: u64) -> bool {
    !oversized(graph, max_bytes).is_empty()
}

/// Splits every constant over `max_bytes` at each of its readers. Returns how many readers were
/// rewritten.
pub fn split_large_constants(graph: &mut Graph, max_bytes: u64) -> Result<usize> {
    transpose_oversized(graph, max_bytes)?;
    let big = oversized(graph, max_bytes);
    if big.is_empty() {
        return Ok(0);
    }
    for &c in &big {
        for reader in graph.consumers(c) {
            if !splittable(graph, reader, c) {
                return Err(refusal(graph, c, reader, max_bytes));
            }
        }
    }
    rewrite(graph, &[&SplitReader { max_bytes }])
}

/// Folding leaves a transpose of a constant for the products that read it in place
/// (`fold::read_through`); over the binding size, the transpose is computed into a constant
/// here instead, which the products then read in chunks like any other.
fn transpose_oversized(graph: &mut Graph, max_bytes: u64) -> Result<()> {
    for c in oversized(graph, max_bytes) {
        for t in graph.consumers(c) {
            let n = graph.node(t);
            if !matches!(n.op, Op::Transpose { .. }) {
                continue;
            }
            let mut p = Patch::new(graph);
            let name = n.name.clone();
            // A matrix kept as block codes is transposed by reading its lines the other way.
            let codes = (graph.blocked().get(&c))
                .filter(|_| graph.shape(c).len() == 2)
                .map(|codes| codes.transposed());
            let transposed = match codes {
                Some(codes) => p.blocked_constant(&name, n.shape.clone(), codes),
                None => {
                    let source = graph
                        .const_tensor(c)
                        .expect("oversized nodes are constants");
                    let value =
                        crate::reference::eval_typed(&n.op, &[&source.to_array()], n.dtype)?;
                    p.constant(&name, value.to_tensor(n.dtype))
                }
            };
            p.claim_name(transposed);
            p.replace(t, transposed);
            graph.apply(p.finish());
        }
    }
    // The replaced transposes still read their sources: gone, they are no readers to split.
    graph.remove_dead();
    Ok(())
}

/// The bytes a tensor of `shape` takes on the device (every value is f32 or f32-sized there).
pub fn bytes(shape: &[usize]) -> u64 {
    4 * shape.iter().map(|&d| d as u64).product::<u64>()
}

/// Whether `reader`'s use of constant `c` has a split form.
fn splittable(g: &Graph, reader: NodeId, c: NodeId) -> bool {
    let ins = g.inputs_of(reader);
    let only = |i: usize| ins.iter().enumerate().all(|(k, &n)| (n == c) == (k == i));
    match g.node(reader).op {
        Op::Gather { .. } => only(0) && g.node(c).dtype == DType::F32,
        Op::MatMul => g.shape(c).len() == 2 && (only(0) || only(1)),
        Op::Gemm { .. } => only(1),
        _ => false,
    }
}

struct SplitReader {
    max_bytes: u64,
}

impl Rule for SplitReader {
    fn name(&self) -> &str {
        "split_large_constant"
    }

    fn apply(&self, graph: &Graph, node: NodeId) -> Result<Option<PatchOps>> {
        let ins = graph.inputs_of(node);
        let Some(&c) = ins.iter().find(|&&n| {
            matches!(graph.node(n).op, Op::Const(_)) && bytes(graph.shape(n)) > self.max_bytes
        }) else {
            return Ok(None);
        };
        let mut p = Patch::new(graph);
        let axis = split_axis(graph, node, c);
        let parts = chunks(&mut p, c, axis, self.max_bytes);
        let y = read_chunks(&mut p, node, c, &parts)?;
        p.replace(node, y);
        Ok(Some(p.finish()))
    }
}

/// The axis along which `reader` needs its operand `c` cut: the gathered axis, a MatMul's or
/// Gemm's output columns (N), or the rows of a left MatMul operand.
fn split_axis(g: &Graph, reader: NodeId, c: NodeId) -> usize {
    match g.node(reader).op {
        Op::Gather { axis } => axis,
        Op::MatMul if g.inputs_of(reader)[1] == c => 1,
        Op::MatMul => 0,
        Op::Gemm { trans_b, .. } => usize::from(!trans_b),
        _ => unreachable!("splittable() admitted the reader"),
    }
}

/// The value of `reader` computed from the chunks of its operand `c` (each: chunk, first index
/// along the split axis, length).
fn read_chunks(
    p: &mut Patch,
    node: NodeId,
    c: NodeId,
    parts: &[(PatchRef, usize, usize)],
) -> Result<PatchRef> {
    let graph = p.graph();
    let ins = graph.inputs_of(node);
    Ok(match graph.node(node).op.clone() {
        Op::Gather { axis } => {
            let dim = graph.shape(c)[axis];
            gather(p, node, parts, ins[1], axis, dim)?
        }
        Op::MatMul if ins[1] == c => {
            let products = parts
                .iter()
                .map(|&(wi, _, _)| add(p, node, Op::MatMul, &[ins[0].into(), wi], "mm"))
                .collect::<Result<Vec<_>>>()?;
            let rank = graph.shape(node).len();
            concat(p, node, products, rank - 1)?
        }
        Op::MatMul => {
            // W [M, K] on the left: M is the result's second-to-last axis, or its last when
            // the right operand is a vector.
            let products = parts
                .iter()
                .map(|&(wi, _, _)| add(p, node, Op::MatMul, &[wi, ins[1].into()], "mm"))
                .collect::<Result<Vec<_>>>()?;
            let rank = graph.shape(node).len();
            let vector = graph.shape(ins[1]).len() == 1;
            concat(p, node, products, if vector { rank - 1 } else { rank - 2 })?
        }
        op @ Op::Gemm { .. } => {
            let n = graph.shape(node)[1];
            let mut products = vec![];
            for &(wi, start, len) in parts {
                let mut args: Vec<PatchRef> = vec![ins[0].into(), wi];
                if let Some(&bias) = ins.get(2) {
                    let bs = graph.shape(bias).to_vec();
                    let sliced = bs.last() == Some(&n) && n > 1;
                    args.push(if sliced {
                        slice_last(p, node, bias.into(), &bs, start, len)?
                    } else {
                        bias.into()
                    });
                }
                products.push(add(p, node, op.clone(), &args, "gemm")?);
            }
            concat(p, node, products, 1)?
        }
        _ => unreachable!("splittable() admitted the reader"),
    })
}

/// A trainable tensor larger than `max_bytes`: constant `c` cut once into chunk constants along
/// the one axis all its readers agree on, each reader rewritten over the shared chunks. Returns
/// the chunks (node, axis, first index, length), which training then makes its parameters, so
/// each chunk's gradient, Adam moments and update fit a binding. Readers that need different
/// axes (a Gather of rows and a product by columns) are refused by name.
pub fn split_parameter(graph: &mut Graph, c: NodeId, max_bytes: u64) -> Result<Vec<Chunk>> {
    let readers = graph.consumers(c);
    let name = graph.node(c).name.clone();
    let mut axis = None;
    for &r in &readers {
        if !splittable(graph, r, c) {
            return Err(refusal(graph, c, r, max_bytes));
        }
        let a = split_axis(graph, r, c);
        if axis.is_some_and(|b| b != a) {
            return Err(Error::Unsupported(vec![format!(
                "trainable '{name}' ({} bytes) exceeds the device's {max_bytes}-byte storage \
                 binding, and its readers need it cut along different axes",
                bytes(graph.shape(c))
            )]));
        }
        axis = Some(a);
    }
    let axis = axis.unwrap_or(0);
    let Op::Const(t) = graph.node(c).op.clone() else {
        return Err(Error::graph(format!(
            "parameter '{name}' is not a constant"
        )));
    };
    let mut p = Patch::new(graph);
    let chunks: Vec<(usize, PatchRef)> = cut(&t, axis, max_bytes)
        .into_iter()
        .map(|(start, part)| (start, p.constant(&format!("{name}/rows_{start}"), part)))
        .collect();
    let applied = graph.apply(p.finish());
    let out: Vec<Chunk> = chunks
        .into_iter()
        .map(|(start, r)| Chunk {
            node: applied.id(r),
            axis,
            start,
        })
        .collect();
    for r in readers {
        let mut p = Patch::new(graph);
        let parts: Vec<(PatchRef, usize, usize)> = out
            .iter()
            .map(|ch| (ch.node.into(), ch.start, graph.shape(ch.node)[axis]))
            .collect();
        let y = read_chunks(&mut p, r, c, &parts)?;
        p.replace(r, y);
        let ops = p.finish();
        graph.apply(ops);
    }
    Ok(out)
}

/// One chunk of a split parameter.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub node: NodeId,
    /// The axis the tensor was cut along, and where along it this chunk starts.
    pub axis: usize,
    pub start: usize,
}

/// How many indices along `axis` one chunk of a tensor of `shape` holds within `max_bytes`.
fn rows_per_chunk(shape: &[usize], axis: usize, max_bytes: u64) -> usize {
    let slab = bytes(shape) / shape[axis].max(1) as u64;
    ((max_bytes / slab.max(1)) as usize).max(1)
}

/// The error for an oversized constant whose reader has no split form.
fn refusal(graph: &Graph, c: NodeId, reader: NodeId, max_bytes: u64) -> Error {
    let n = graph.node(c);
    Error::Unsupported(vec![format!(
        "constant '{}' ({}, {} bytes) exceeds the device's {max_bytes}-byte storage binding, and \
         its reader '{}' ({}) cannot be split (Gather rows, MatMul and Gemm can)",
        n.name,
        shape_str(&n.shape),
        bytes(&n.shape),
        graph.node(reader).label,
        graph.node(reader).op.name()
    )])
}

/// Adds a node named after `of`, with a tag.
fn add(p: &mut Patch, of: NodeId, op: Op, ins: &[PatchRef], tag: &str) -> Result<PatchRef> {
    let g = p.graph();
    let name = g.fresh_name(&format!("{}/split_{tag}", g.node(of).name));
    let label = format!("{}/split_{tag}", g.node(of).label);
    p.add(op, ins, &name, &label)
}

/// Constant `c` cut along `axis` into chunks of at most `max_bytes`: (chunk, first index, length).
fn chunks(p: &mut Patch, c: NodeId, axis: usize, max_bytes: u64) -> Vec<(PatchRef, usize, usize)> {
    let g = p.graph();
    let Op::Const(t) = &g.node(c).op else {
        unreachable!("only constants are split")
    };
    let name = g.node(c).name.clone();
    let blocked = g.blocked().get(&c).cloned();
    let t = t.clone();
    let (dim, per) = (t.shape[axis], rows_per_chunk(&t.shape, axis, max_bytes));
    (0..dim)
        .step_by(per)
        .map(|start| {
            let len = per.min(dim - start);
            let name = format!("{name}/rows_{start}");
            let mut shape = t.shape.clone();
            shape[axis] = len;
            // A chunk that keeps its codes gets its values from them, when they are read.
            let codes = (blocked.as_ref()).and_then(|b| chunk_codes(b, &t.shape, axis, start, len));
            let chunk = match codes {
                Some(codes) => p.blocked_constant(&name, shape, codes),
                None => p.constant(&name, t.slice_axis(axis, start, len)),
            };
            (chunk, start, len)
        })
        .collect()
}

/// The block-quantized codes of a chunk, `start..start + len` along `axis`, of a constant of
/// `shape` that keeps its codes: where the cut runs across its lines (columns of a weight whose
/// lines run down them, leading rows of a table whose lines run along them), the chunk keeps
/// its lines' codes, and the device stores it as codes too.
fn chunk_codes(
    codes: &BlockCodes,
    shape: &[usize],
    axis: usize,
    start: usize,
    len: usize,
) -> Option<BlockCodes> {
    let rank = shape.len();
    match codes.format.down_columns {
        true if rank == 2 && axis == 1 => codes.lines(start, len),
        false if axis == 0 && rank >= 2 => {
            let per_index = shape[1..rank - 1].iter().product::<usize>();
            codes.lines(start * per_index, len * per_index)
        }
        _ => None,
    }
}

/// `t` cut along `axis` into pieces of at most `max_bytes`: (first index, piece).
fn cut(t: &Tensor, axis: usize, max_bytes: u64) -> Vec<(usize, Tensor)> {
    let dim = t.shape[axis];
    let per = rows_per_chunk(&t.shape, axis, max_bytes);
    (0..dim)
        .step_by(per)
        .map(|start| (start, t.slice_axis(axis, start, per.min(dim - start))))
        .collect()
}

/// Gather over row chunks of the data along `axis` (`dim` rows in all): per chunk, the ids
/// shifted into it (ids below the chunk become its length, which reads as 0), gathered, and all
/// summed.
fn gather(
    p: &mut Patch,
    node: NodeId,
    parts: &[(PatchRef, usize, usize)],
    ids: NodeId,
    axis: usize,
    dim: usize,
) -> Result<PatchRef> {
    let id_type = p.graph().node(ids).dtype;
    let konst = |p: &mut Patch, tag: &str, v: i64| {
        let name = p
            .graph()
            .fresh_name(&format!("{}/split_{tag}", p.graph().node(node).name));
        let t = match id_type {
            DType::F32 => Tensor::scalar(v as f32),
            _ => Tensor::i64(vec![], vec![v]),
        };
        p.constant(&name, t)
    };
    // Negative ids count from the end: normalise them first.
    let zero = konst(p, "zero", 0);
    let dim_c = konst(p, "dim", dim as i64);
    let negative = add(
        p,
        node,
        Op::Binary(Binary::Less),
        &[ids.into(), zero],
        "negative",
    )?;
    let wrapped = add(
        p,
        node,
        Op::Binary(Binary::Add),
        &[ids.into(), dim_c],
        "wrapped",
    )?;
    let ids_n = add(p, node, Op::Where, &[negative, wrapped, ids.into()], "ids")?;
    let mut sum: Option<PatchRef> = None;
    for &(chunk, start, len) in parts {
        let off = konst(p, "offset", start as i64);
        let len_c = konst(p, "len", len as i64);
        let shifted = add(p, node, Op::Binary(Binary::Sub), &[ids_n, off], "shifted")?;
        let below = add(p, node, Op::Binary(Binary::Less), &[shifted, zero], "below")?;
        let local = add(p, node, Op::Where, &[below, len_c, shifted], "local")?;
        let rows = add(p, node, Op::Gather { axis }, &[chunk, local], "gather")?;
        sum = Some(match sum {
            None => rows,
            Some(s) => add(p, node, Op::Binary(Binary::Add), &[s, rows], "sum")?,
        });
    }
    Ok(sum.expect("a split tensor has at least one chunk"))
}

/// Concatenation of `parts` along `axis`, as a tree when there are more than a kernel binds.
fn concat(p: &mut Patch, of: NodeId, mut parts: Vec<PatchRef>, axis: usize) -> Result<PatchRef> {
    while parts.len() > 1 {
        parts = parts
            .chunks(MAX_CONCAT_INPUTS)
            .map(|group| match group {
                [one] => Ok(*one),
                _ => add(p, of, Op::Concat { axis }, group, "concat"),
            })
            .collect::<Result<Vec<_>>>()?;
    }
    Ok(parts[0])
}

/// `x[..., start..start + len]` along the last axis.
fn slice_last(
    p: &mut Patch,
    of: NodeId,
    x: PatchRef,
    shape: &[usize],
    start: usize,
    len: usize,
) -> Result<PatchRef> {
    let rank = shape.len();
    let mut starts = vec![0i64; rank];
    let mut ends: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    starts[rank - 1] = start as i64;
    ends[rank - 1] = (start + len) as i64;
    let op = Op::Slice {
        starts,
        ends,
        steps: vec![1; rank],
    };
    add(p, of, op, &[x], "bias")
}
