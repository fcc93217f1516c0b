//! Reverse-mode automatic differentiation as a graph pass: from a scalar loss, add the nodes
//! that compute the gradient of every trainable parameter, in the same graph.
//!
//! Only nodes on a path from a parameter to the loss get a cotangent, so frozen weights get no
//! gradient and no gradient memory. `Op::StopGradient` ends a path (DoRA's detached norm).
//! The per-op rules live in [`rules`], one function per op.

mod rules;

use crate::error::{Error, Result};
use crate::ir::{Binary, Graph, NodeId, Op};
use crate::tensor::{shape_str, Tensor};
use petgraph::Direction;
use std::collections::{HashMap, HashSet};

/// Adds the gradient of `loss` (a scalar) with respect to each of `params` to the graph and
/// returns the gradient node of each parameter (a parameter the loss does not depend on gets
/// an explicit zero). The graph is edited only if the whole construction succeeds.
pub fn differentiate(graph: &mut Graph, loss: NodeId, params: &[NodeId]) -> Result<Vec<NodeId>> {
    if !graph.shape(loss).iter().all(|&d| d == 1) {
        return Err(Error::Graph(format!(
            "the loss '{}' must be a scalar, it has shape {}",
            graph.node(loss).name,
            shape_str(graph.shape(loss))
        )));
    }
    let mut g = graph.clone();
    let grads = Builder::new(&mut g).run(loss, params)?;
    *graph = g;
    Ok(grads)
}

/// Graph-building helpers the gradient rules share.
pub(crate) struct Builder<'g> {
    pub g: &'g mut Graph,
    counter: usize,
}

impl<'g> Builder<'g> {
    fn new(g: &'g mut Graph) -> Self {
        Builder { g, counter: 0 }
    }

    /// Adds a gradient node named after the node it differentiates.
    pub fn add(&mut self, op: Op, inputs: &[NodeId], of: NodeId, tag: &str) -> Result<NodeId> {
        self.counter += 1;
        let base = &self.g.node(of).name;
        let name = self.g.fresh_name(&format!("grad/{base}/{tag}"));
        let label = format!("{}/grad/{tag}", self.g.node(of).label);
        self.g.add(op, inputs, &name, &label)
    }

    pub fn scalar(&mut self, v: f64, of: NodeId, tag: &str) -> NodeId {
        let name = self
            .g
            .fresh_name(&format!("grad/{}/{tag}", self.g.node(of).name));
        self.g.add_const(&name, Tensor::scalar(v as f32))
    }

    pub fn binary(
        &mut self,
        b: Binary,
        x: NodeId,
        y: NodeId,
        of: NodeId,
        tag: &str,
    ) -> Result<NodeId> {
        self.add(Op::Binary(b), &[x, y], of, tag)
    }

    /// Sums `x` down to `shape` over the dims that broadcasting expanded.
    pub fn sum_to(&mut self, x: NodeId, shape: &[usize], of: NodeId, tag: &str) -> Result<NodeId> {
        let xs = self.g.shape(x).to_vec();
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
        if self.g.shape(y) != shape {
            y = self.add(
                Op::Reshape {
                    shape: shape.to_vec(),
                },
                &[y],
                of,
                &format!("{tag}_reshape"),
            )?;
        }
        Ok(y)
    }

    pub fn reshape(&mut self, x: NodeId, shape: &[usize], of: NodeId, tag: &str) -> Result<NodeId> {
        if self.g.shape(x) == shape {
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

    fn run(mut self, loss: NodeId, params: &[NodeId]) -> Result<Vec<NodeId>> {
        // Nodes whose value depends on a parameter: the only ones that need a cotangent.
        let mut depends: HashSet<NodeId> = HashSet::new();
        let order = self.g.topo_order()?;
        let param_set: HashSet<NodeId> = params.iter().copied().collect();
        for &n in &order {
            let dep = param_set.contains(&n)
                || (!matches!(self.g.node(n).op, Op::StopGradient)
                    && self
                        .g
                        .graph
                        .neighbors_directed(n, Direction::Incoming)
                        .any(|i| depends.contains(&i)));
            if dep {
                depends.insert(n);
            }
        }
        let mut cotangents: HashMap<NodeId, NodeId> = HashMap::new();
        if depends.contains(&loss) {
            let one = self.scalar(1.0, loss, "seed");
            let shape = self.g.shape(loss).to_vec();
            let seed = self.reshape(one, &shape, loss, "seed_shape")?;
            cotangents.insert(loss, seed);
        }
        for &n in order.iter().rev() {
            let Some(&dy) = cotangents.get(&n) else {
                continue;
            };
            if param_set.contains(&n) && self.g.inputs_of(n).is_empty() {
                continue;
            }
            let inputs = self.g.inputs_of(n);
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
                    Some(&prev) => self.binary(Binary::Add, prev, grad, *input, "acc")?,
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
                    let shape = self.g.shape(p).to_vec();
                    let z = self.scalar(0.0, p, "zero");
                    self.add(Op::Expand { shape }, &[z], p, "zero_grad")
                }
            })
            .collect()
    }
}
