//! A plan made real: one pipeline and bind group per kernel, one buffer per plan buffer,
//! constants uploaded once. A run writes the inputs, records the whole forward pass into one
//! command encoder, submits once and reads the outputs back.

use super::{Gpu, Scopes};
use crate::codegen::{self, BufferRole, Plan};
use crate::error::{Error, Result};
use crate::ir::Graph;
use crate::tensor::{shape_str, Data};
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};

/// One kernel, ready to dispatch.
struct Dispatch {
    name: String,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

/// A graph output and where it is read back through.
struct Readback {
    name: String,
    buffer: usize,
    len: usize,
    staging: wgpu::Buffer,
}

/// A compiled graph on one device. Build once with [`Executable::new`], then [`run`] it as many
/// times as needed; runs on one executable are serialised (they share buffers).
///
/// [`run`]: Executable::run
pub struct Executable {
    device: wgpu::Device,
    queue: wgpu::Queue,
    uncaptured: Arc<Mutex<Vec<String>>>,
    buffers: Vec<wgpu::Buffer>,
    dispatches: Vec<Dispatch>,
    /// Graph inputs: name, buffer, shape.
    inputs: Vec<(String, usize, Vec<usize>)>,
    outputs: Vec<Readback>,
    run_lock: Mutex<()>,
}

impl Executable {
    /// Creates the buffers (checked against the device's limits first, so an oversized tensor is
    /// named instead of failing inside wgpu), uploads the constants of `graph`, and builds one
    /// pipeline per kernel from its naga-validated source.
    pub fn new(gpu: &Gpu, plan: &Plan, graph: &Graph) -> Result<Executable> {
        let device = gpu.device();
        let uncaptured = gpu.uncaptured();
        check_limits(gpu, plan)?;

        let scopes = Scopes::push(device);
        let buffers: Vec<wgpu::Buffer> = plan
            .buffers
            .iter()
            .map(|spec| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&spec.name),
                    size: spec.bytes(),
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_DST
                        | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            })
            .collect();
        for (spec, buffer) in plan.buffers.iter().zip(&buffers) {
            if let BufferRole::Const(n) = spec.role {
                let tensor = graph.const_tensor(n).ok_or_else(|| {
                    Error::Graph(format!(
                        "plan buffer '{}' is a constant, but node {} is not",
                        spec.name,
                        n.index()
                    ))
                })?;
                let data: Vec<f32> = match &tensor.data {
                    Data::F32(v) => v.to_vec(),
                    Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
                };
                if !data.is_empty() {
                    gpu.queue()
                        .write_buffer(buffer, 0, bytemuck::cast_slice(&data));
                }
            }
        }
        let outputs: Vec<Readback> = plan
            .outputs
            .iter()
            .map(|(name, b)| Readback {
                name: name.clone(),
                buffer: *b,
                len: plan.buffers[*b].len,
                staging: device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("readback {name}")),
                    size: plan.buffers[*b].bytes(),
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
            })
            .collect();
        scopes.check("creating buffers", &uncaptured)?;

        let mut dispatches = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            codegen::validate(&k.name, &k.source)?;
            let scopes = Scopes::push(device);
            let (pipeline, bind_group) = build_kernel(device, k, &buffers);
            scopes.check(&format!("building kernel {}", k.name), &uncaptured)?;
            dispatches.push(Dispatch {
                name: k.name.clone(),
                pipeline,
                bind_group,
                workgroups: k.workgroups,
            });
        }
        let inputs = plan
            .inputs
            .iter()
            .map(|(name, b)| (name.clone(), *b, plan.buffers[*b].shape.clone()))
            .collect();
        Ok(Executable {
            device: device.clone(),
            queue: gpu.queue().clone(),
            uncaptured,
            buffers,
            dispatches,
            inputs,
            outputs,
            run_lock: Mutex::new(()),
        })
    }

    /// Runs the forward pass on `inputs` (flat row-major f32 per graph input name) and returns
    /// the graph outputs by name. Every input must be present with exactly its shape's element
    /// count, and no unknown names may be given (a misspelt input would otherwise be silently
    /// ignored). All kernels go into one command encoder and one submission.
    pub fn run(&self, inputs: &HashMap<String, Vec<f32>>) -> Result<HashMap<String, Vec<f32>>> {
        let _serial = self.run_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.check_inputs(inputs)?;

        let scopes = Scopes::push(&self.device);
        for (name, b, _) in &self.inputs {
            let data = &inputs[name];
            if !data.is_empty() {
                self.queue
                    .write_buffer(&self.buffers[*b], 0, bytemuck::cast_slice(data));
            }
        }
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("forward"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("forward"),
                timestamp_writes: None,
            });
            for d in &self.dispatches {
                let [x, y, z] = d.workgroups;
                if x == 0 || y == 0 || z == 0 {
                    continue;
                }
                pass.push_debug_group(&d.name);
                pass.set_pipeline(&d.pipeline);
                pass.set_bind_group(0, &d.bind_group, &[]);
                pass.dispatch_workgroups(x, y, z);
                pass.pop_debug_group();
            }
        }
        for o in &self.outputs {
            if o.len > 0 {
                let bytes = 4 * o.len as u64;
                encoder.copy_buffer_to_buffer(&self.buffers[o.buffer], 0, &o.staging, 0, bytes);
            }
        }
        let submission = self.queue.submit([encoder.finish()]);

        let (tx, rx) = mpsc::channel();
        let mapped: Vec<&Readback> = self.outputs.iter().filter(|o| o.len > 0).collect();
        for (i, o) in mapped.iter().enumerate() {
            let tx = tx.clone();
            o.staging
                .slice(..4 * o.len as u64)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send((i, r));
                });
        }
        drop(tx);
        let polled = self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        });
        let scope_result = scopes.check("running the forward pass", &self.uncaptured);
        let mut map_errors = vec![];
        let mut is_mapped = vec![false; mapped.len()];
        for (i, r) in rx.try_iter() {
            match r {
                Ok(()) => is_mapped[i] = true,
                Err(e) => map_errors.push(format!("reading back '{}': {e}", mapped[i].name)),
            }
        }
        if map_errors.is_empty() && is_mapped.iter().any(|m| !m) {
            map_errors.push("an output buffer was not mapped after the wait".into());
        }
        let result = (|| {
            polled.map_err(|e| Error::Gpu(format!("waiting for the forward pass: {e}")))?;
            scope_result?;
            if !map_errors.is_empty() {
                return Err(Error::Gpu(map_errors.join("; ")));
            }
            let mut out = HashMap::new();
            for o in &self.outputs {
                let values = if o.len == 0 {
                    vec![]
                } else {
                    let view = o
                        .staging
                        .slice(..4 * o.len as u64)
                        .get_mapped_range()
                        .map_err(|e| {
                            Error::Gpu(format!("reading back output '{}': {e:?}", o.name))
                        })?;
                    bytemuck::cast_slice::<u8, f32>(&view).to_vec()
                };
                out.insert(o.name.clone(), values);
            }
            Ok(out)
        })();
        // Unmap whatever got mapped, so the next run can map again even after a failure.
        for (o, m) in mapped.iter().zip(is_mapped) {
            if m {
                o.staging.unmap();
            }
        }
        result
    }

    fn check_inputs(&self, inputs: &HashMap<String, Vec<f32>>) -> Result<()> {
        for (name, _, shape) in &self.inputs {
            let expected: usize = shape.iter().product();
            match inputs.get(name) {
                None => {
                    return Err(Error::Input(format!(
                        "missing input '{name}' (shape {})",
                        shape_str(shape)
                    )))
                }
                Some(v) if v.len() != expected => {
                    return Err(Error::Input(format!(
                        "input '{name}' has {} values, its shape {} needs {expected}",
                        v.len(),
                        shape_str(shape)
                    )))
                }
                Some(_) => {}
            }
        }
        let mut unknown: Vec<&String> = inputs
            .keys()
            .filter(|k| !self.inputs.iter().any(|(n, _, _)| n == *k))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            let known: Vec<&str> = self.inputs.iter().map(|(n, _, _)| n.as_str()).collect();
            return Err(Error::Input(format!(
                "unknown input(s) {unknown:?}; the graph's inputs are {known:?}"
            )));
        }
        Ok(())
    }
}

/// Refuses, with the tensor's or kernel's name, what the device cannot hold or dispatch.
fn check_limits(gpu: &Gpu, plan: &Plan) -> Result<()> {
    let limits = gpu.limits();
    let max_binding = limits.max_storage_buffer_binding_size;
    let max_buffer = limits.max_buffer_size;
    for spec in &plan.buffers {
        let bytes = spec.bytes();
        let (limit, what) = if bytes > max_buffer {
            (max_buffer, "max_buffer_size")
        } else if bytes > max_binding {
            (max_binding, "max_storage_buffer_binding_size")
        } else {
            continue;
        };
        return Err(Error::Gpu(format!(
            "tensor '{}' ({}, {bytes} bytes) exceeds this adapter's {what} of {limit} bytes ({})",
            spec.name,
            shape_str(&spec.shape),
            gpu.describe()
        )));
    }
    let max_storage = limits.max_storage_buffers_per_shader_stage as usize;
    let max_groups = limits.max_compute_workgroups_per_dimension;
    for k in &plan.kernels {
        let n = k.inputs.len() + 1;
        if n > max_storage {
            return Err(Error::Gpu(format!(
                "kernel {} binds {n} storage buffers, this adapter allows {max_storage}",
                k.name
            )));
        }
        if k.workgroups.iter().any(|&w| w > max_groups) {
            return Err(Error::Gpu(format!(
                "kernel {} dispatches {:?} workgroups, this adapter allows {max_groups} per \
                 dimension (plan with a lower PlanOptions::max_workgroups_per_dim)",
                k.name, k.workgroups
            )));
        }
    }
    Ok(())
}

/// The pipeline (explicit layout: read-only inputs, one read-write output) and bind group of
/// one kernel.
fn build_kernel(
    device: &wgpu::Device,
    k: &codegen::Kernel,
    buffers: &[wgpu::Buffer],
) -> (wgpu::ComputePipeline, wgpu::BindGroup) {
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(&k.name),
        source: wgpu::ShaderSource::Wgsl(k.source.as_str().into()),
    });
    let entries: Vec<wgpu::BindGroupLayoutEntry> = (0..=k.inputs.len())
        .map(|i| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: i < k.inputs.len(),
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    let bind_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&k.name),
        entries: &entries,
    });
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&k.name),
        bind_group_layouts: &[Some(&bind_layout)],
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&k.name),
        layout: Some(&layout),
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let bind_entries: Vec<wgpu::BindGroupEntry> = k
        .bindings()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: buffers[b].as_entire_binding(),
        })
        .collect();
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(&k.name),
        layout: &bind_layout,
        entries: &bind_entries,
    });
    (pipeline, bind_group)
}
