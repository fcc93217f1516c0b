//! Running compiled steps. Parameters, gradients and Adam moments stay on the device; each step
//! uploads one batch and the learning rate and reads back only the loss (and the gradient norm
//! when clipping). The reference executor runs the same program in f64 for tests and as the
//! CPU fallback.

use super::optimizer::{step_scalars, GRAD_NORM_OUTPUT};
use super::program::Program;
use crate::error::{Error, Result};
use crate::runtime::{Executable, Gpu};
use crate::tensor::{Array, Tensor};
use std::collections::{BTreeMap, HashMap};

enum Engine {
    Gpu(Box<Executable>),
    /// Values of every state input, kept on the host.
    Reference(HashMap<String, Array>),
}

/// What a step reports.
#[derive(Clone, Debug)]
pub struct StepMetrics {
    pub loss: f64,
    pub grad_norm: Option<f64>,
}

/// A program with its state, ready to step.
pub struct Session {
    pub program: Program,
    engine: Engine,
    /// Names of every state input (parameters, moments).
    state_names: Vec<String>,
    /// Optimizer steps taken (the host computes each step's bias corrections from it).
    steps: usize,
}

/// The step counter's name in saved optimizer state.
pub const STEP_KEY: &str = "optim.step";

impl Session {
    /// Compiles for the GPU (when `gpu` is given) or the reference executor, and initialises
    /// the state: parameters from the program, moments at zero, step 0.
    pub fn new(program: Program, gpu: Option<&Gpu>) -> Result<Session> {
        let g = &program.graph;
        let state_names: Vec<String> = g
            .updates()
            .iter()
            .map(|(s, _)| g.node(*s).name.clone())
            .collect();
        let engine = match gpu {
            Some(gpu) => Engine::Gpu(Box::new(Executable::compile(gpu, g)?)),
            None => Engine::Reference(HashMap::new()),
        };
        let mut s = Session {
            program,
            engine,
            state_names,
            steps: 0,
        };
        let mut init: BTreeMap<String, Array> = BTreeMap::new();
        for p in &s.program.params {
            init.insert(p.name.clone(), p.initial.to_array());
            let zeros = Array::zeros(p.initial.shape.clone());
            init.insert(p.exp_avg.clone(), zeros.clone());
            init.insert(p.exp_avg_sq.clone(), zeros);
        }
        s.write_state(&init)?;
        Ok(s)
    }

    /// Overwrites state tensors by name (resume, or loading an adapter).
    pub fn write_state(&mut self, values: &BTreeMap<String, Array>) -> Result<()> {
        for (name, v) in values {
            if name == STEP_KEY {
                self.steps = v.data.first().copied().unwrap_or(0.0) as usize;
                continue;
            }
            if !self.state_names.contains(name) {
                return Err(Error::input(format!(
                    "'{name}' is not part of the training state"
                )));
            }
            let id = self
                .program
                .graph
                .find_by_name(name)
                .expect("state names are graph inputs");
            let want = self.program.graph.shape(id);
            if want != v.shape.as_slice() {
                return Err(Error::input(format!(
                    "state '{name}' has shape {:?}, the program expects {:?}",
                    v.shape, want
                )));
            }
            match &mut self.engine {
                Engine::Gpu(exe) => {
                    let data: Vec<f32> = v.data.iter().map(|&x| x as f32).collect();
                    exe.write(name, &data)?;
                }
                Engine::Reference(state) => {
                    // Keep the host state in f32, as the device does, so both engines agree.
                    state.insert(name.clone(), v.to_tensor_f32().to_array());
                }
            }
        }
        Ok(())
    }

    /// Reads the whole state back (parameters, moments, step counter).
    pub fn read_state(&self) -> Result<BTreeMap<String, Array>> {
        let mut out = BTreeMap::new();
        out.insert(
            STEP_KEY.to_string(),
            Array::new(vec![], vec![self.steps as f64]),
        );
        for name in &self.state_names {
            let id = self
                .program
                .graph
                .find_by_name(name)
                .expect("state names are graph inputs");
            let shape = self.program.graph.shape(id).to_vec();
            let a = match &self.engine {
                Engine::Gpu(exe) => Array::from_f32(shape, &exe.read(name)?),
                Engine::Reference(state) => state[name].clone(),
            };
            out.insert(name.clone(), a);
        }
        Ok(out)
    }

    /// The current value of each parameter, by parameter name.
    pub fn params(&self) -> Result<BTreeMap<String, Tensor>> {
        let state = self.read_state()?;
        let mut out = BTreeMap::new();
        // A tensor trained in chunks (over the device's binding limit) comes back whole.
        let mut chunks: BTreeMap<String, (usize, Vec<(usize, Tensor)>)> = BTreeMap::new();
        for p in &self.program.params {
            let t = state[&p.name].to_tensor_f32();
            match &p.part_of {
                None => {
                    out.insert(p.name.clone(), t);
                }
                Some((whole, axis, start)) => {
                    let e = chunks.entry(whole.clone()).or_insert((*axis, vec![]));
                    e.1.push((*start, t));
                }
            }
        }
        for (whole, (axis, mut parts)) in chunks {
            parts.sort_by_key(|(start, _)| *start);
            let parts: Vec<Tensor> = parts.into_iter().map(|(_, t)| t).collect();
            out.insert(whole, Tensor::concat_axis(&parts, axis));
        }
        Ok(out)
    }

    /// One optimizer step on one batch (model inputs and labels by name) at learning rate `lr`.
    /// `fetch` names extra graph outputs to read back (gradients in tests).
    pub fn step(
        &mut self,
        batch: &BTreeMap<String, Array>,
        lr: f64,
        fetch: &[&str],
    ) -> Result<(StepMetrics, BTreeMap<String, Array>)> {
        let mut wanted: Vec<&str> = vec!["loss"];
        if self.program.has_grad_norm {
            wanted.push(GRAD_NORM_OUTPUT);
        }
        wanted.extend_from_slice(fetch);
        let g = &self.program.graph;
        let out_shape = |name: &str| -> Result<Vec<usize>> {
            g.outputs()
                .iter()
                .find(|o| o.0 == name)
                .map(|o| g.shape(o.1).to_vec())
                .ok_or_else(|| Error::input(format!("the training step has no output '{name}'")))
        };
        let mut results: BTreeMap<String, Array> = BTreeMap::new();
        match &mut self.engine {
            Engine::Gpu(exe) => {
                let mut inputs: HashMap<String, Vec<f32>> = batch
                    .iter()
                    .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
                    .collect();
                for (k, v) in step_scalars(&self.program.optimizer, lr, self.steps + 1) {
                    inputs.insert(k.into(), vec![v as f32]);
                }
                let out = exe.step(&inputs, &wanted)?;
                for (k, v) in out {
                    let shape = out_shape(&k)?;
                    results.insert(k, Array::from_f32(shape, &v));
                }
            }
            Engine::Reference(state) => {
                let mut inputs: HashMap<String, Array> = state.clone();
                for (k, v) in batch {
                    inputs.insert(k.clone(), v.clone());
                }
                for (k, v) in step_scalars(&self.program.optimizer, lr, self.steps + 1) {
                    inputs.insert(k.into(), Array::new(vec![], vec![v as f32 as f64]));
                }
                let values = crate::reference::run_all(g, &inputs)?;
                for name in &wanted {
                    let id = g
                        .outputs()
                        .iter()
                        .find(|o| o.0 == *name)
                        .map(|o| o.1)
                        .ok_or_else(|| {
                            Error::input(format!("the training step has no output '{name}'"))
                        })?;
                    results.insert(name.to_string(), values[&id].clone());
                }
                for (s, next) in g.updates() {
                    let v = values[next].to_tensor_f32().to_array();
                    state.insert(g.node(*s).name.clone(), v);
                }
            }
        }
        self.steps += 1;
        let loss = results["loss"].data[0];
        let grad_norm = results.get(GRAD_NORM_OUTPUT).map(|a| a.data[0]);
        Ok((StepMetrics { loss, grad_norm }, results))
    }

    /// The number of optimizer steps taken so far (the device's counter).
    pub fn steps_taken(&self) -> Result<usize> {
        Ok(self.steps)
    }
}
