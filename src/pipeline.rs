//! The two pipelines every command compiles through, each spelled out once: what happens to an
//! imported (and adapted) graph before inference, and before a training step. `run`, `compile`,
//! `generate`, `eval`, `demo` and `train` choose options; none lists passes of its own.
//!
//! Inference: merge the adapters (when asked) -> keep the chosen output -> turn tensors written
//! at run time (trained weights under evaluation) into inputs -> fold every constant expression
//! (the frozen DoRA norms included) -> store frozen weights in half precision (when asked).
//!
//! Training: [`crate::train::build_for_device`] (trainable tensors as state, fused DoRA norms,
//! loss, backward pass, AdamW, transpose simplification, folding) -> half-precision storage of
//! what stays frozen (when asked).

use crate::error::{Error, Result, Subject};
use crate::ir::{Graph, Half, Patch};
use crate::passes::HalfReport;
use crate::train::{BuildOptions, Program};
use std::collections::HashSet;

/// How an inference graph is prepared.
#[derive(Clone, Debug, Default)]
pub struct Inference {
    /// Fold the adapters into the base weights (`--merged`).
    pub merge: bool,
    /// Keep only this graph output (None: all of them).
    pub output: Option<String>,
    /// Constants written before each run instead of folded (trained tensors under evaluation):
    /// they become graph inputs.
    pub live: Vec<String>,
    /// Store frozen weights in this half-precision format (`--storage`).
    pub storage: Option<Half>,
}

/// A graph after a pipeline, with what half-precision storage did to it.
pub struct Prepared<T> {
    pub value: T,
    pub storage: Option<HalfReport>,
}

impl Inference {
    pub fn run(&self, mut graph: Graph) -> Result<Prepared<Graph>> {
        if self.merge {
            if graph.adapters().is_empty() {
                return Err(Error::input(
                    "--merged: the model has no adapters (give --adapter DIR or a rewritten model)",
                ));
            }
            crate::passes::merge_adapters(&mut graph)?;
        }
        if self.output.is_some() || !self.live.is_empty() {
            select(&mut graph, self.output.as_deref(), &self.live)?;
        }
        crate::passes::fold_constants(&mut graph, &HashSet::new())?;
        let storage = self.storage.map(|h| store(&mut graph, h)).transpose()?;
        Ok(Prepared {
            value: graph,
            storage,
        })
    }
}

/// The training pipeline: the step graph for `opts`, for a device that binds at most
/// `max_tensor_bytes` per buffer, frozen weights stored in `storage`.
pub fn training(
    graph: Graph,
    opts: &BuildOptions,
    max_tensor_bytes: Option<u64>,
    storage: Option<Half>,
) -> Result<Prepared<Program>> {
    let mut program = crate::train::build_for_device(graph, opts, max_tensor_bytes)?;
    let storage = storage.map(|h| store(&mut program.graph, h)).transpose()?;
    Ok(Prepared {
        value: program,
        storage,
    })
}

/// The last stage of both pipelines: frozen weights rounded to `half` and marked half-stored
/// ([`crate::passes::store_half`]); refuses weights the format cannot hold.
pub fn store(graph: &mut Graph, half: Half) -> Result<HalfReport> {
    let r = crate::passes::store_half(graph, half);
    if r.overflowed > 0 {
        return Err(Error::input_at(
            Subject::flag_value("--storage", half.name()),
            format!(
                "{} weight values are beyond the format's range (|w| > 65504); use \
             --storage bf16, which has f32's range",
                r.overflowed
            ),
        ));
    }
    Ok(r)
}

/// Keeps one output (when given) and makes the `live` constants graph inputs, in one patch.
fn select(graph: &mut Graph, output: Option<&str>, live: &[String]) -> Result<()> {
    let mut p = Patch::new(graph);
    if let Some(name) = output {
        let (_, id) = graph.find_output(Some(name))?;
        p.set_outputs(vec![(name.to_string(), id.into())]);
    }
    for name in live {
        let node = graph.find_by_name(name).ok_or_else(|| {
            Error::graph(format!("trained tensor '{name}' is not in the model graph"))
        })?;
        p.promote_to_input(node)?;
    }
    graph.apply(p.finish());
    graph.remove_dead();
    Ok(())
}
