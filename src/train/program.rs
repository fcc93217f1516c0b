//! Builds the training-step graph: trainable tensors become persistent state inputs, the loss
//! is appended, autodiff adds the backward pass for the trainable tensors only, AdamW adds the
//! update, and constant folding computes every frozen-only expression (such as the DoRA norm's
//! `||W0[:, j]||²`) once, at compile time.

use super::loss::{self, LossKind};
use super::optimizer::{self, AdamW};
use crate::error::{Error, Result, Subject};
use crate::ir::{Graph, Method, NodeId, Op, Patch, PatchRef};
use crate::passes::autodiff::gradients;
use crate::tensor::Tensor;
use std::collections::HashSet;

/// What is trained (paper section 5 and its ablations), all through the same rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainMethod {
    /// A, B and m.
    Dora,
    /// A and B of a LoRA adapter.
    Lora,
    /// m only (A, B frozen).
    Magnitude,
    /// A and B (m frozen).
    Direction,
    /// The targeted weights themselves (no adapter).
    Full,
}

impl TrainMethod {
    pub fn name(self) -> &'static str {
        match self {
            TrainMethod::Dora => "dora",
            TrainMethod::Lora => "lora",
            TrainMethod::Magnitude => "magnitude",
            TrainMethod::Direction => "direction",
            TrainMethod::Full => "full",
        }
    }

    /// The adapter the model needs for this method (None for full fine-tuning).
    pub fn adapter(self) -> Option<Method> {
        match self {
            TrainMethod::Lora => Some(Method::Lora),
            TrainMethod::Full => None,
            _ => Some(Method::Dora),
        }
    }
}

/// Which tensor of a layer a parameter is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamRole {
    LoraA,
    LoraB,
    Magnitude,
    Weight,
}

impl ParamRole {
    /// The suffix used in golden files and checkpoints.
    pub fn key(self) -> &'static str {
        match self {
            ParamRole::LoraA => "lora_A",
            ParamRole::LoraB => "lora_B",
            ParamRole::Magnitude => "magnitude",
            ParamRole::Weight => "weight",
        }
    }
}

/// One trainable tensor.
#[derive(Clone, Debug)]
pub struct Param {
    /// The graph input holding it (the tensor's IR name, e.g. `fc.lora_A.weight`).
    pub name: String,
    pub module: String,
    pub role: ParamRole,
    pub node: NodeId,
    pub exp_avg: String,
    pub exp_avg_sq: String,
    /// The gradient's graph output name (present when built with `expose_grads`).
    pub grad_output: String,
    /// Starting value.
    pub initial: Tensor,
    /// For a chunk of a tensor too large for one device binding: the whole tensor's name, the
    /// axis it was cut along and where this chunk starts (see `passes::split::split_parameter`).
    pub part_of: Option<(String, usize, usize)>,
}

/// Options for [`build`].
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub method: TrainMethod,
    pub loss: LossKind,
    /// The model output the loss applies to (None: the first).
    pub output: Option<String>,
    /// Name of the labels input (the data tensor).
    pub labels: String,
    pub optimizer: AdamW,
    /// Differentiate through the DoRA norm instead of detaching it.
    pub exact_norm_grad: bool,
    /// Also make every gradient a graph output (tests); training fetches only the loss.
    pub expose_grads: bool,
    /// Modules whose weights `full` trains (None: every adapted-or-linear layer).
    pub full_targets: Option<Vec<String>>,
    /// Keep no activation that the next layer's products can compute again as they load it
    /// from a value kept anyway (DoRA's `u`): less memory, and on lavapipe a faster step too
    /// (`passes::recompute`). What `dorac train` does unless `--store-activations`.
    pub lean_activations: bool,
}

/// A compiled training step.
pub struct Program {
    pub graph: Graph,
    pub params: Vec<Param>,
    /// Model inputs fed from the data set each step.
    pub data_inputs: Vec<String>,
    pub labels: String,
    pub loss: LossKind,
    pub optimizer: AdamW,
    pub has_grad_norm: bool,
}

/// Builds the step graph from a model that already carries the adapters the method needs
/// (or, for `full`, from the base model).
pub fn build(graph: Graph, opts: &BuildOptions) -> Result<Program> {
    build_for_device(graph, opts, None)
}

/// [`build`] for a device that binds at most `max_tensor_bytes` per buffer: a trainable tensor
/// larger than that (a fully fine-tuned embedding) is trained as chunks that each fit, with their
/// own gradients, moments and updates.
pub fn build_for_device(
    mut graph: Graph,
    opts: &BuildOptions,
    max_tensor_bytes: Option<u64>,
) -> Result<Program> {
    let (output_name, _) =
        graph
            .find_output(opts.output.as_deref())
            .map_err(|e| match &opts.output {
                Some(name) => e.within(Subject::flag_value("--output", name)),
                None => e,
            })?;
    let data_inputs: Vec<String> = graph
        .inputs()
        .iter()
        .map(|&i| graph.node(i).name.clone())
        .collect();
    if data_inputs.contains(&opts.labels) {
        return Err(Error::input_at(
            Subject::flag_value("--labels", &opts.labels),
            "that name is a model input; the labels need a tensor of their own",
        ));
    }

    if opts.exact_norm_grad {
        let mut p = Patch::new(&graph);
        for n in graph.node_ids() {
            if matches!(graph.node(n).op, Op::StopGradient) {
                p.replace_op(n, Op::Identity)?;
            }
        }
        graph.apply(p.finish());
    }

    // The trainable tensors, in a stable order: by layer, then A, B, m.
    let mut chosen: Vec<(NodeId, String, ParamRole)> = vec![];
    match opts.method {
        TrainMethod::Full => {
            let layers = crate::passes::find_linear_layers(&graph);
            for l in layers {
                let wanted = match &opts.full_targets {
                    None => !l.is_embedding(),
                    Some(t) => t
                        .iter()
                        .any(|p| crate::passes::matches_target(&l.module, p)),
                };
                if wanted {
                    chosen.push((l.weight, l.module.clone(), ParamRole::Weight));
                }
            }
        }
        method => {
            if graph.adapters().is_empty() {
                return Err(Error::input_at(
                    Subject::flag_value("--method", method.name()),
                    "the model has no adapters",
                ));
            }
            for a in graph.adapters() {
                let need = method.adapter();
                if need != Some(a.method) {
                    return Err(Error::input_at(
                        Subject::flag_value("--method", method.name()),
                        format!("layer '{}' has a {} adapter", a.module, a.method.name()),
                    ));
                }
                if matches!(
                    method,
                    TrainMethod::Dora | TrainMethod::Lora | TrainMethod::Direction
                ) {
                    chosen.push((a.lora_a, a.module.clone(), ParamRole::LoraA));
                    chosen.push((a.lora_b, a.module.clone(), ParamRole::LoraB));
                }
                if matches!(method, TrainMethod::Dora | TrainMethod::Magnitude) {
                    if let Some(m) = a.magnitude {
                        chosen.push((m, a.module.clone(), ParamRole::Magnitude));
                    }
                }
            }
        }
    }
    if chosen.is_empty() {
        return Err(Error::input("nothing to train: no layer matched"));
    }
    // Shared weights (tied embeddings, say) are trained once.
    let mut seen = HashSet::new();
    chosen.retain(|c| seen.insert(c.0));
    // Tensors over the device's binding limit are trained in chunks.
    let mut parts: std::collections::HashMap<NodeId, (String, usize, usize)> = Default::default();
    if let Some(limit) = max_tensor_bytes {
        let mut fitted = vec![];
        for (node, module, role) in chosen {
            if crate::passes::split::bytes(graph.shape(node)) <= limit {
                fitted.push((node, module, role));
                continue;
            }
            let whole = graph.node(node).name.clone();
            for ch in crate::passes::split::split_parameter(&mut graph, node, limit)? {
                parts.insert(ch.node, (whole.clone(), ch.axis, ch.start));
                fitted.push((ch.node, module.clone(), role));
            }
        }
        chosen = fitted;
        graph.remove_dead();
    }
    // The split may have replaced the node that computes the output: find it again by name.
    let output = graph
        .outputs()
        .iter()
        .find(|o| o.0 == output_name)
        .map(|o| o.1)
        .expect("the output name was checked above");

    // Trainable constants become persistent inputs, keeping their node ids (and so the
    // adapter records) intact.
    let mut params = vec![];
    let mut promote = Patch::new(&graph);
    for (node, module, role) in &chosen {
        let initial = promote.promote_to_input(*node)?;
        let name = graph.node(*node).name.clone();
        params.push(Param {
            exp_avg: format!("optim.exp_avg.{name}"),
            exp_avg_sq: format!("optim.exp_avg_sq.{name}"),
            grad_output: format!("grad.{name}"),
            name,
            module: module.clone(),
            role: *role,
            node: *node,
            initial,
            part_of: parts.get(node).cloned(),
        });
    }
    graph.apply(promote.finish());

    // Each DoRA norm becomes one op (one kernel, with its own gradient in exact-norm mode).
    crate::passes::fuse_dora_norms(&mut graph)?;
    // The model's own outputs are not needed by a training step: only the loss comes back.
    let mut forward = Patch::new(&graph);
    let (_labels, loss) = loss::append(&mut forward, opts.loss, output, &opts.labels)?;
    forward.set_outputs(vec![("loss".into(), loss)]);
    let loss_node = graph.apply(forward.finish()).id(loss);
    // The backward pass and the update: one patch.
    let mut backward = Patch::new(&graph);
    let nodes: Vec<NodeId> = params.iter().map(|p| p.node).collect();
    let grads = gradients(&mut backward, loss_node, &nodes)?;
    if opts.expose_grads {
        for (p, &g) in params.iter().zip(&grads) {
            backward.add_output(&p.grad_output, g);
        }
    }
    let pairs: Vec<(NodeId, PatchRef)> = nodes.iter().copied().zip(grads).collect();
    let (_moments, grad_norm) = optimizer::append(&mut backward, &opts.optimizer, &pairs)?;
    if let Some(n) = grad_norm {
        backward.add_output(optimizer::GRAD_NORM_OUTPUT, n);
    }
    let applied = graph.apply(backward.finish());
    // An activation the backward pass can compute again from a value it keeps anyway (DoRA's
    // `u`) is not kept beside it.
    let backward_nodes: HashSet<NodeId> = applied.ids().iter().copied().collect();
    crate::passes::recompute_activations(&mut graph, &backward_nodes, opts.lean_activations)?;
    // Autodiff's transposes of products become products of transposes, which kernels read in
    // place; then frozen-only work (W0 column norms, transposed frozen weights...) happens once.
    crate::passes::simplify_transposes(&mut graph)?;
    crate::passes::fold_constants(&mut graph, &HashSet::new())?;
    Ok(Program {
        graph,
        params,
        data_inputs,
        labels: opts.labels.clone(),
        loss: opts.loss,
        optimizer: opts.optimizer.clone(),
        has_grad_norm: grad_norm.is_some(),
    })
}
