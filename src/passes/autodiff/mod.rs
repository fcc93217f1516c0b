//! Reverse-mode automatic differentiation as a graph pass: from a scalar loss, add the nodes
//! that compute the gradient of every trainable parameter, in the same graph.
//!
//! Only nodes on a path from a parameter to the loss get a cotangent, so frozen weights get no
//! gradient and no gradient memory. `Op::StopGradient` ends a path (DoRA's detached norm).
//! The per-op rules live in [`rules`], one function per op.

mod rules;

use crate::error::{Error, Result};
use crate::ir::{Binary, Graph, NodeId, Op, Patch, PatchRef};
use crate::tensor::DType;
use crate::tensor::{shape_str, Tensor};
use std::collections::{HashMap, HashSet};

/// Adds the gradient of `loss` (a scalar) with respect to each of `params` to the graph and
/// returns the gradient node of each parameter (a parameter the loss does not depend on gets
/// an explicit zero). The graph is edited in one patch, only if the whole construction
/// succeeds.
pub fn differentiate(graph: &mut Graph, loss: NodeId, params: &[NodeId]) -> Result<Vec<NodeId>> {
    let mut p = Patch::new(graph);
    let grads = gradients(&mut p, loss, params)?;
    let applied = graph.apply(p.finish());
    Ok(grads.into_iter().map(|g| applied.id(g)).collect())
}

/// [`differentiate`] into a patch the caller goes on building (training adds the optimizer's
/// update to the same patch). `loss` and `params` are nodes of the patch's graph.
pub fn gradients(p: &mut Patch, loss: NodeId, params: &[NodeId]) -> Result<Vec<PatchRef>> {
    let graph = p.graph();
    if !graph.shape(loss).iter().all(|&d| d == 1) {
        return Err(Error::graph(format!(
            "the loss '{}' must be a scalar, it has shape {}",
            graph.node(loss).name,
            shape_str(graph.shape(loss))
        )));
    }
    Builder { p }.run(loss, params)
}

/// Graph-building helpers the gradient rules share: every node goes into one patch, named
/// after the node it differentiates (`grad/<name>/<tag>`, made unique when the patch is applied).
pub(crate) struct Builder<'p, 'g> {
    p: &'p mut Patch<'g>,
}

impl Builder<'_, '_> {
    /// The graph being differentiated.
    pub fn graph(&self) -> &Graph {
        self.p.graph()
    }

    pub fn shape(&self, x: PatchRef) -> &[usize] {
        self.p.shape(x)
    }

    pub fn dtype(&self, x: PatchRef) -> DType {
        self.p.dtype(x)
    }

    pub fn op(&self, x: PatchRef) -> &Op {
        self.p.op(x)
    }

    pub fn label(&self, x: PatchRef) -> &str {
        self.p.label(x)
    }

    /// Adds a gradient node named after the node it differentiates.
    pub fn add(
        &mut self,
        op: Op,
        inputs: &[PatchRef],
        of: PatchRef,
        tag: &str,
    ) -> Result<PatchRef> {
        let name = format!("grad/{}/{tag}", self.p.name(of));
        let label = format!("{}/grad/{tag}", self.p.label(of));
        self.p.add(op, inputs, &name, &label)
    }

    /// Adds a constant named after the node it differentiates.
    pub fn constant(&mut self, of: PatchRef, tag: &str, t: Tensor) -> PatchRef {
        let name = format!("grad/{}/{tag}", self.p.name(of));
        self.p.constant(&name, t)
    }

    pub fn scalar(&mut self, v: f64, of: PatchRef, tag: &str) -> PatchRef {
        self.constant(of, tag, Tensor::scalar(v as f32))
    }

    pub fn binary(
        &mut self,
        b: Binary,
        x: PatchRef,
        y: PatchRef,
        of: PatchRef,
        tag: &str,
    ) -> Result<PatchRef> {
        self.add(Op::Binary(b), &[x, y], of, tag)
    }

    /// Sums `x` down to `shape` over the dims that broadcasting expanded.
    pub fn sum_to(
        &mut self,
        x: PatchRef,
        shape: &[usize],
        of: PatchRef,
        tag: &str,
    ) -> Result<PatchRef> {
        let xs = self.shape(x).to_vec();
        if xs == shape {
            return Ok(x);
        }
        let lead = xs.len() - shape.len().min(xs.len());
        let axes: Vec<usize> = (0..xs.len())
            .filter(|&d| d < lead || (shape[d - lead] == 1 && xs[d] != 1))
            .collect();
        let mut y = x;
        if !axes.is_empty() {
            let op = Op::Reduce {
                kind: crate::ir::Reduce::Sum,
                axes,
                keepdims: true,
            };
            y = self.add(op, &[y], of, &format!("{tag}_sum"))?;
        }
        self.reshape(y, shape, of, &format!("{tag}_reshape"))
    }

    pub fn reshape(
        &mut self,
        x: PatchRef,
        shape: &[usize],
        of: PatchRef,
        tag: &str,
    ) -> Result<PatchRef> {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.add(
            Op::Reshape {
                shape: shape.to_vec(),
            },
            &[x],
            of,
            tag,
        )
    }

    fn run(mut self, loss: NodeId, params: &[NodeId]) -> Result<Vec<PatchRef>> {
        let graph = self.p.graph();
        // Nodes whose value depends on a parameter: the only ones that need a cotangent.
        let mut depends: HashSet<NodeId> = HashSet::new();
        let order = graph.topo_order()?;
        let param_set: HashSet<NodeId> = params.iter().copied().collect();
        for &n in &order {
            let dep = param_set.contains(&n)
                || (!matches!(graph.node(n).op, Op::StopGradient)
                    && graph.inputs_of(n).iter().any(|i| depends.contains(i)));
            if dep {
                depends.insert(n);
            }
        }
        let mut cotangents: HashMap<NodeId, PatchRef> = HashMap::new();
        if depends.contains(&loss) {
            let one = self.scalar(1.0, loss.into(), "seed");
            let shape = graph.shape(loss).to_vec();
            let seed = self.reshape(one, &shape, loss.into(), "seed_shape")?;
            cotangents.insert(loss, seed);
        }
        for &n in order.iter().rev() {
            let Some(&dy) = cotangents.get(&n) else {
                continue;
            };
            let inputs = graph.inputs_of(n);
            if param_set.contains(&n) && inputs.is_empty() {
                continue;
            }
            let wanted: Vec<bool> = inputs.iter().map(|i| depends.contains(i)).collect();
            if !wanted.iter().any(|&w| w) {
                continue;
            }
            let grads = rules::input_grads(&mut self, n, dy, &wanted)?;
            for ((input, grad), want) in inputs.iter().zip(grads).zip(wanted) {
                let (true, Some(grad)) = (want, grad) else {
                    continue;
                };
                let total = match cotangents.get(input) {
                    Some(&prev) => self.binary(Binary::Add, prev, grad, (*input).into(), "acc")?,
                    None => grad,
                };
                cotangents.insert(*input, total);
            }
        }
        params
            .iter()
            .map(|&p| match cotangents.get(&p) {
                Some(&g) => Ok(g),
                None => {
                    // The loss does not depend on p: an explicit zero keeps the optimizer uniform.
                    let shape = graph.shape(p).to_vec();
                    let z = self.scalar(0.0, p.into(), "zero");
                    self.add(Op::Expand { shape }, &[z], p.into(), "zero_grad")
                }
            })
            .collect()
    }
}
