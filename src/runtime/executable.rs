//! A plan made real: one pipeline and bind group per kernel, one device allocation per plan
//! buffer that owns its storage (intermediates with disjoint lifetimes share one), constants
//! uploaded once. A step writes the inputs it is given, records the whole graph into one command
//! encoder (kernels, then the read-back copies of the outputs asked for, then the state copies),
//! submits once and reads back only those outputs.
//!
//! Graph inputs keep their values between runs: a state input (`Graph::updates`) is written
//! once and then updated on the device by every step; any other input may be given anew to each
//! step or written once and reused.

use super::{Gpu, Scopes};
use crate::codegen::{self, BufferId, BufferRole, Plan, StateCopy};
use crate::error::{Error, Result, Subject};
use crate::ir::{Graph, NodeId};
use crate::tensor::shape_str;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

/// One kernel, ready to dispatch.
struct Dispatch {
    name: String,
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    workgroups: [u32; 3],
}

/// A graph input.
struct InputSlot {
    name: String,
    buffer: BufferId,
    shape: Vec<usize>,
    /// Updated on the device after every step (`Graph::updates`).
    state: bool,
}

impl InputSlot {
    fn len(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A graph output and where it is read back through.
struct Readback {
    name: String,
    buffer: BufferId,
    len: usize,
    staging: wgpu::Buffer,
}

/// What the executable's buffers hold so far.
struct Status {
    /// Per input (in `inputs` order): whether it has been given a value.
    written: Vec<bool>,
    /// Whether a run has completed, so the outputs hold values.
    ran: bool,
}

/// A compiled graph on one device. Build once with [`Executable::new`], then [`run`] or
/// [`step`] it as many times as needed; calls on one executable are serialised (they share
/// buffers).
///
/// [`run`]: Executable::run
/// [`step`]: Executable::step
pub struct Executable {
    device: wgpu::Device,
    queue: wgpu::Queue,
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// Per plan buffer, the device buffer holding it (the allocation of its `storage` owner).
    buffers: Vec<wgpu::Buffer>,
    dispatches: Vec<Dispatch>,
    inputs: Vec<InputSlot>,
    outputs: Vec<Readback>,
    copies: Vec<StateCopy>,
    status: Mutex<Status>,
    build: BuildTimes,
}

/// Where building an [`Executable`] went, for `--verbose`: seconds per phase, and how many
/// kernels shared how many compiled pipelines.
#[derive(Clone, Debug, Default)]
pub struct BuildTimes {
    /// Planning and code generation (zero when the plan was given).
    pub plan: f64,
    /// Creating the buffers and uploading the constants (the weights).
    pub upload: f64,
    /// From the start of the upload until every kernel's pipeline and bind group is ready: the
    /// pipelines are validated and compiled alongside the upload.
    pub pipelines: f64,
    pub kernels: usize,
    /// Distinct pipelines: kernels whose code differs only in comments share one.
    pub distinct_pipelines: usize,
    /// Threads that compiled them (the uploading one helps once its upload is done).
    pub threads: usize,
}

impl Executable {
    /// Plans `graph` for this device and creates its executable. Constants larger than one of
    /// the device's storage bindings are first split at their readers
    /// ([`crate::passes::split_large_constants`]), so a model whose embedding exceeds the
    /// binding limit (GPT-2 small's 154 MB on lavapipe's 128 MiB) still runs.
    pub fn compile(gpu: &Gpu, graph: &Graph) -> Result<Executable> {
        let start = Instant::now();
        let (graph, plan) = Executable::plan_for(gpu, graph)?;
        let planned = start.elapsed().as_secs_f64();
        let mut exe = Executable::new(gpu, &plan, &graph)?;
        exe.build.plan = planned;
        Ok(exe)
    }

    /// The graph and plan [`Executable::compile`] runs on `gpu`: constants larger than one
    /// binding split, thin products turned on a CPU driver (`codegen::turn_thin_products`),
    /// planned with the device's options (its target and binding limit). What a benchmark
    /// reports about a compiled graph's kernels and memory comes from here.
    pub fn plan_for<'g>(gpu: &Gpu, graph: &'g Graph) -> Result<(Cow<'g, Graph>, Plan)> {
        let limit = gpu.limits().max_storage_buffer_binding_size;
        let options = gpu.plan_options();
        let mut graph = Cow::Borrowed(graph);
        if crate::passes::split::needs_split(&graph, limit) {
            crate::passes::split_large_constants(graph.to_mut(), limit)?;
        }
        if options.target == crate::codegen::Target::Cpu
            && crate::codegen::has_thin_products(&graph)
        {
            crate::codegen::turn_thin_products(graph.to_mut())?;
        }
        let plan = crate::codegen::plan_hosting_recomputations(&mut graph, &options)?;
        Ok((graph, plan))
    }

    /// Creates the allocations (checked against the device's limits first, so an oversized
    /// tensor is named instead of failing inside wgpu), uploads the constants of `graph`, and
    /// builds one pipeline per kernel from its naga-validated source.
    pub fn new(gpu: &Gpu, plan: &Plan, graph: &Graph) -> Result<Executable> {
        let device = gpu.device();
        let uncaptured = gpu.uncaptured();
        check_limits(gpu, plan)?;
        let start = Instant::now();

        // Kernels whose code differs only in comments (the same layer shape repeated through a
        // model: the kernel and node names are comments) share one pipeline, compiled once.
        let mut distinct: Vec<&codegen::Kernel> = vec![];
        let mut first_of: HashMap<String, usize> = HashMap::new();
        let pipeline_of: Vec<usize> = (plan.kernels.iter())
            .map(|k| {
                *first_of
                    .entry(codegen::without_comments(&k.source))
                    .or_insert_with(|| {
                        distinct.push(k);
                        distinct.len() - 1
                    })
            })
            .collect();
        // The pipelines compile on helper threads while this one creates the buffers and writes
        // the weights, then helps: on a CPU driver both are CPU work, and neither waits for the
        // other.
        let next = AtomicUsize::new(0);
        let compile = || -> Result<Vec<(usize, Built)>> {
            let mut built = vec![];
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(k) = distinct.get(i) else {
                    return Ok(built);
                };
                // The planner validated every source with naga (`codegen::plan_grouped`); wgpu
                // validates it again here, and its error names the kernel.
                let scopes = Scopes::push(device);
                let pipeline = build_pipeline(device, k, gpu.pipeline_cache());
                scopes.check(&format!("building kernel {}", k.name), &uncaptured)?;
                built.push((i, pipeline));
            }
        };
        let helpers = std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .clamp(1, MAX_COMPILE_THREADS)
            .min(distinct.len());
        let (created, compiled) = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..helpers).map(|_| scope.spawn(compile)).collect();
            let created = create_buffers(gpu, plan, graph);
            let upload = start.elapsed().as_secs_f64();
            let mut compiled = compile();
            for handle in handles {
                let more = handle
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p));
                match (&mut compiled, more) {
                    (Ok(all), Ok(more)) => all.extend(more),
                    (Ok(_), Err(e)) => compiled = Err(e),
                    (Err(_), _) => {}
                }
            }
            (created.map(|c| (c, upload)), compiled)
        });
        let ((buffers, outputs), upload) = created?;
        let mut pipelines: Vec<Option<Built>> = vec![None; distinct.len()];
        for (i, built) in compiled? {
            pipelines[i] = Some(built);
        }
        let mut dispatches = Vec::with_capacity(plan.kernels.len());
        for (k, &p) in plan.kernels.iter().zip(&pipeline_of) {
            let Some((pipeline, layout)) = pipelines[p].clone() else {
                return Err(Error::gpu(format!(
                    "kernel {}: its pipeline was not built (runtime bug)",
                    k.name
                )));
            };
            let scopes = Scopes::push(device);
            let bind_group = bind_kernel(device, k, &layout, plan, &buffers);
            scopes.check(&format!("binding kernel {}", k.name), &uncaptured)?;
            dispatches.push(Dispatch {
                name: k.name.clone(),
                pipeline,
                bind_group,
                workgroups: k.workgroups,
            });
        }
        if !pipelines.is_empty() {
            gpu.save_pipeline_cache();
        }
        let build = BuildTimes {
            plan: 0.0,
            upload,
            pipelines: start.elapsed().as_secs_f64(),
            kernels: plan.kernels.len(),
            distinct_pipelines: pipelines.len(),
            threads: helpers + 1,
        };
        let inputs: Vec<InputSlot> = plan
            .inputs
            .iter()
            .map(|(name, b)| InputSlot {
                name: name.clone(),
                buffer: *b,
                shape: plan.buffers[*b].shape.clone(),
                state: plan.is_state(name),
            })
            .collect();
        Ok(Executable {
            device: device.clone(),
            queue: gpu.queue().clone(),
            uncaptured,
            buffers,
            dispatches,
            status: Mutex::new(Status {
                written: vec![false; inputs.len()],
                ran: false,
            }),
            inputs,
            outputs,
            copies: plan.copies.clone(),
            build,
        })
    }

    /// Runs the graph on `inputs` (flat row-major f32 per graph input name) and returns every
    /// graph output by name.
    ///
    /// Without state, every input must be present with exactly its shape's element count, and no
    /// unknown names may be given (a misspelt input would otherwise be silently ignored). With
    /// state (`Graph::updates`), it is [`step`](Executable::step) with every output fetched.
    pub fn run(&self, inputs: &HashMap<String, Vec<f32>>) -> Result<HashMap<String, Vec<f32>>> {
        if !self.inputs.iter().any(|i| i.state) {
            self.check_inputs(inputs)?;
        }
        let all: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
        self.step(inputs, &all)
    }

    /// One step: writes `inputs` (any graph inputs, state or not, by name), records all kernels,
    /// the read-back of the `fetch`ed graph outputs and then the state copies into ONE command
    /// encoder, submits once and returns only the fetched outputs (as computed by this step, from
    /// the state before its update).
    ///
    /// Inputs not given keep their last value: every non-state input must have been given to
    /// this or an earlier call (or [`write`](Executable::write)), and every state input must
    /// have been initialised with `write` before the first step. Errors name what is missing,
    /// unknown or of the wrong length, and then nothing is written or run.
    pub fn step(
        &self,
        inputs: &HashMap<String, Vec<f32>>,
        fetch: &[&str],
    ) -> Result<HashMap<String, Vec<f32>>> {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        // Check everything before writing anything.
        let mut given = Vec::with_capacity(inputs.len());
        let mut unknown = vec![];
        for (name, data) in inputs {
            match self.input_index(name) {
                Some(i) => {
                    self.check_len(i, data)?;
                    given.push((i, data));
                }
                None => unknown.push(name.as_str()),
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(Error::input(format!(
                "unknown input(s) {unknown:?}; the graph's inputs are {:?}",
                self.input_names()
            )));
        }
        let mut fetched: Vec<&Readback> = vec![];
        for &name in fetch {
            let o = self
                .outputs
                .iter()
                .find(|o| o.name == name)
                .ok_or_else(|| {
                    let outputs: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
                    Error::input(format!(
                        "cannot fetch '{name}': the graph's outputs are {outputs:?}"
                    ))
                })?;
            if !fetched.iter().any(|f| f.name == o.name) {
                fetched.push(o);
            }
        }
        let has_value = |i: usize| status.written[i] || given.iter().any(|&(g, _)| g == i);
        let missing = |state: bool| -> Vec<String> {
            (0..self.inputs.len())
                .filter(|&i| self.inputs[i].state == state && !has_value(i))
                .map(|i| {
                    let slot = &self.inputs[i];
                    format!("'{}' ({})", slot.name, shape_str(&slot.shape))
                })
                .collect()
        };
        let (missing_inputs, missing_state) = (missing(false), missing(true));
        if !missing_state.is_empty() {
            return Err(Error::input(format!(
                "state input(s) {} not initialised: write() their initial values before the \
                 first step",
                missing_state.join(", ")
            )));
        }
        if !missing_inputs.is_empty() {
            return Err(Error::input(format!(
                "missing input(s) {}: pass them to this step or write() them first",
                missing_inputs.join(", ")
            )));
        }

        let scopes = Scopes::push(&self.device);
        for &(i, data) in &given {
            if !data.is_empty() {
                self.queue.write_buffer(
                    &self.buffers[self.inputs[i].buffer],
                    0,
                    bytemuck::cast_slice(data),
                );
            }
            status.written[i] = true;
        }
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("kernels"),
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
        // Read-backs before the state copies: outputs are this step's values, even one that
        // shares a state's buffer.
        for o in &fetched {
            if o.len > 0 {
                let bytes = 4 * o.len as u64;
                encoder.copy_buffer_to_buffer(&self.buffers[o.buffer], 0, &o.staging, 0, bytes);
            }
        }
        for c in &self.copies {
            encoder.copy_buffer_to_buffer(
                &self.buffers[c.from],
                0,
                &self.buffers[c.to],
                0,
                c.bytes,
            );
        }
        let submission = self.queue.submit([encoder.finish()]);
        let reads: Vec<(&str, &wgpu::Buffer, usize)> = fetched
            .iter()
            .map(|o| (o.name.as_str(), &o.staging, o.len))
            .collect();
        let result = self.download(submission, scopes, &reads, "running the step");
        if result.is_ok() {
            status.ran = true;
            if let Ok(path) = std::env::var(PROFILE_ENV) {
                self.write_profile(Path::new(&path))?;
            }
        }
        result
    }

    /// Where building this executable went.
    pub fn build_times(&self) -> &BuildTimes {
        &self.build
    }

    /// Seconds one pass of the kernels takes on the device, without uploads or read-backs: the
    /// whole dispatch list recorded `repeats` times into one submission, waited for, divided by
    /// `repeats`. The benches' view of kernel throughput on a real GPU, where the transfers of a
    /// `run` would hide it. (On Vulkan, wgpu separates the repeats with barriers: each writes
    /// the same buffers.) Like the profile, the kernels recompute from the buffers as the last
    /// step left them (state is not updated), so call it after a step.
    pub fn time_kernels(&self, repeats: usize) -> Result<f64> {
        let repeats = repeats.max(1);
        let scopes = Scopes::push(&self.device);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("time kernels"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("time kernels"),
                timestamp_writes: None,
            });
            for _ in 0..repeats {
                for d in &self.dispatches {
                    let [x, y, z] = d.workgroups;
                    if x == 0 || y == 0 || z == 0 {
                        continue;
                    }
                    pass.set_pipeline(&d.pipeline);
                    pass.set_bind_group(0, &d.bind_group, &[]);
                    pass.dispatch_workgroups(x, y, z);
                }
            }
        }
        let start = std::time::Instant::now();
        let submission = self.queue.submit([encoder.finish()]);
        self.download(submission, scopes, &[], "timing the kernels")?;
        Ok(start.elapsed().as_secs_f64() / repeats as f64)
    }

    /// Times every kernel on its own (one submission each, waited for, best of three) and appends
    /// the times to
    /// `path`, slowest first: a developer's view of where a step goes. The kernels run again on
    /// the buffers as the step left them, so the values they write are meaningless; the next
    /// step recomputes everything from its inputs and the state, which they do not touch.
    fn write_profile(&self, path: &Path) -> Result<()> {
        let mut times = vec![];
        for d in &self.dispatches {
            let [x, y, z] = d.workgroups;
            if x == 0 || y == 0 || z == 0 {
                continue;
            }
            // The best of three runs: one kernel's time on a shared machine is noisy.
            let mut best = f64::MAX;
            for _ in 0..3 {
                let mut encoder =
                    self.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some("profile"),
                        });
                {
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("profile"),
                        timestamp_writes: None,
                    });
                    pass.set_pipeline(&d.pipeline);
                    pass.set_bind_group(0, &d.bind_group, &[]);
                    pass.dispatch_workgroups(x, y, z);
                }
                let start = std::time::Instant::now();
                let submission = self.queue.submit([encoder.finish()]);
                let _ = self.device.poll(wgpu::PollType::Wait {
                    submission_index: Some(submission),
                    timeout: None,
                });
                best = best.min(start.elapsed().as_secs_f64());
            }
            times.push((best, d.name.as_str()));
        }
        times.sort_by(|a, b| b.0.total_cmp(&a.0));
        let total: f64 = times.iter().map(|t| t.0).sum();
        let mut text = format!("{} kernels, {total:.3} s in all\n", times.len());
        for (t, name) in &times {
            text += &format!(
                "{:9.3} ms {:5.1}%  {name}\n",
                t * 1e3,
                100.0 * t / total.max(1e-12)
            );
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        f.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))
    }

    /// Sets graph input `name` (a state or any other input) to `data`, flat row-major, which
    /// must have exactly its shape's element count. Takes effect for the next step.
    pub fn write(&self, name: &str, data: &[f32]) -> Result<()> {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let i = self.input_index(name).ok_or_else(|| {
            Error::input(format!(
                "cannot write '{name}': the graph's inputs are {:?}",
                self.input_names()
            ))
        })?;
        self.check_len(i, data)?;
        let scopes = Scopes::push(&self.device);
        if !data.is_empty() {
            self.queue.write_buffer(
                &self.buffers[self.inputs[i].buffer],
                0,
                bytemuck::cast_slice(data),
            );
        }
        scopes.check(&format!("writing input '{name}'"), &self.uncaptured)?;
        status.written[i] = true;
        Ok(())
    }

    /// The current value of graph input `name` (for a state, its value after the last step) or
    /// of graph output `name` (as the last step computed it, whether fetched or not; an output
    /// that is a state input's value reads as that state's current value).
    pub fn read(&self, name: &str) -> Result<Vec<f32>> {
        let status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let (buffer, len) = if let Some(i) = self.input_index(name) {
            if !status.written[i] {
                return Err(Error::input(format!(
                    "input '{name}' has no value yet: write() it or pass it to a step first"
                )));
            }
            (self.inputs[i].buffer, self.inputs[i].len())
        } else if let Some(o) = self.outputs.iter().find(|o| o.name == name) {
            if !status.ran {
                return Err(Error::input(format!(
                    "output '{name}' has no value yet: run a step first"
                )));
            }
            (o.buffer, o.len)
        } else {
            let outputs: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
            return Err(Error::input(format!(
                "cannot read '{name}': the graph's inputs are {:?} and its outputs {outputs:?}",
                self.input_names()
            )));
        };
        if len == 0 {
            return Ok(vec![]);
        }
        let scopes = Scopes::push(&self.device);
        let staging = staging_buffer(&self.device, &format!("read {name}"), len);
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read"),
            });
        encoder.copy_buffer_to_buffer(&self.buffers[buffer], 0, &staging, 0, 4 * len as u64);
        let submission = self.queue.submit([encoder.finish()]);
        let mut out = self.download(
            submission,
            scopes,
            &[(name, &staging, len)],
            &format!("reading '{name}'"),
        )?;
        Ok(out.remove(name).unwrap_or_default())
    }

    /// Waits for `submission`, checks `scopes`, and copies each mapped staging buffer out (then
    /// unmaps it, even after a failure, so the next call can map it again).
    fn download(
        &self,
        submission: wgpu::SubmissionIndex,
        scopes: Scopes,
        reads: &[(&str, &wgpu::Buffer, usize)],
        context: &str,
    ) -> Result<HashMap<String, Vec<f32>>> {
        let (tx, rx) = mpsc::channel();
        let mapped: Vec<&(&str, &wgpu::Buffer, usize)> =
            reads.iter().filter(|(_, _, len)| *len > 0).collect();
        for (i, (_, staging, len)) in mapped.iter().enumerate() {
            let tx = tx.clone();
            staging
                .slice(..4 * *len as u64)
                .map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send((i, r));
                });
        }
        drop(tx);
        let polled = self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        });
        let scope_result = scopes.check(context, &self.uncaptured);
        let mut map_errors = vec![];
        let mut is_mapped = vec![false; mapped.len()];
        // Map callbacks run inside some thread's poll. When several threads share the device,
        // ours may return before our callbacks fired (another poll holds them), so keep
        // polling, briefly, until every read-back reported or the channel closed.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut reported = 0;
        while reported < mapped.len() {
            match rx.try_recv() {
                Ok((i, r)) => {
                    reported += 1;
                    match r {
                        Ok(()) => is_mapped[i] = true,
                        Err(e) => map_errors.push(format!("reading back '{}': {e}", mapped[i].0)),
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                    let _ = self.device.poll(wgpu::PollType::Poll);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
        if map_errors.is_empty() && is_mapped.iter().any(|m| !m) {
            map_errors.push("a read-back buffer was not mapped after the wait".into());
        }
        let result = (|| {
            polled.map_err(|e| {
                Error::gpu_at(
                    Subject::context(context),
                    format!("waiting for the device: {e}"),
                )
            })?;
            scope_result?;
            if !map_errors.is_empty() {
                return Err(Error::gpu(map_errors.join("; ")));
            }
            let mut out = HashMap::new();
            for &(name, staging, len) in reads {
                let values = if len == 0 {
                    vec![]
                } else {
                    let view = staging
                        .slice(..4 * len as u64)
                        .get_mapped_range()
                        .map_err(|e| Error::gpu(format!("reading back '{name}': {e:?}")))?;
                    bytemuck::cast_slice::<u8, f32>(&view).to_vec()
                };
                out.insert(name.to_string(), values);
            }
            Ok(out)
        })();
        for (r, m) in mapped.iter().zip(is_mapped) {
            if m {
                r.1.unmap();
            }
        }
        result
    }

    fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|i| i.name == name)
    }

    fn input_names(&self) -> Vec<&str> {
        self.inputs.iter().map(|i| i.name.as_str()).collect()
    }

    fn check_len(&self, i: usize, data: &[f32]) -> Result<()> {
        let slot = &self.inputs[i];
        if data.len() != slot.len() {
            return Err(Error::input(format!(
                "input '{}' has {} values, its shape {} needs {}",
                slot.name,
                data.len(),
                shape_str(&slot.shape),
                slot.len()
            )));
        }
        Ok(())
    }

    /// `run`'s strict check for graphs without state: every input given, none unknown.
    fn check_inputs(&self, inputs: &HashMap<String, Vec<f32>>) -> Result<()> {
        for slot in &self.inputs {
            if !inputs.contains_key(&slot.name) {
                return Err(Error::input(format!(
                    "missing input '{}' (shape {})",
                    slot.name,
                    shape_str(&slot.shape)
                )));
            }
        }
        let known: HashSet<&str> = self.input_names().into_iter().collect();
        let mut unknown: Vec<&String> = inputs
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .collect();
        if !unknown.is_empty() {
            unknown.sort();
            return Err(Error::input(format!(
                "unknown input(s) {unknown:?}; the graph's inputs are {:?}",
                self.input_names()
            )));
        }
        Ok(())
    }
}

/// Set to a file path, every run also times each kernel on its own and appends the times there
/// ([`Executable::write_profile`]).
pub const PROFILE_ENV: &str = "DORAC_PROFILE";

/// A MAP_READ buffer for `len` f32 values (at least 4 bytes).
fn staging_buffer(device: &wgpu::Device, label: &str, len: usize) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: 4 * len.max(1) as u64,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
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
        return Err(Error::gpu(format!(
            "tensor '{}' ({}, {bytes} bytes) exceeds this adapter's {what} of {limit} bytes ({}); \
             until dorac splits such tensors for inference, run with --reference (the CPU reference \
             executor, slow) or on a device with a larger limit",
            spec.name,
            shape_str(&spec.shape),
            gpu.describe()
        )));
    }
    let max_storage = limits.max_storage_buffers_per_shader_stage as usize;
    let max_groups = limits.max_compute_workgroups_per_dimension;
    for k in &plan.kernels {
        let n = k.bindings().count();
        if n > max_storage {
            return Err(Error::gpu(format!(
                "kernel {} binds {n} storage buffers, this adapter allows {max_storage}",
                k.name
            )));
        }
        if k.workgroups.iter().any(|&w| w > max_groups) {
            return Err(Error::gpu(format!(
                "kernel {} dispatches {:?} workgroups, this adapter allows {max_groups} per \
                 dimension (plan with a lower PlanOptions::max_workgroups_per_dim)",
                k.name, k.workgroups
            )));
        }
    }
    Ok(())
}

/// Writes `tensor` into the start of `buffer`, which is mapped (at creation): as f32, or packed
/// in pairs of 16-bit values (element 2k in the low half of word k) when the plan stores it in
/// half precision.
fn write_mapped(
    buffer: &wgpu::Buffer,
    tensor: &crate::tensor::Tensor,
    stored: Option<crate::ir::Stored>,
    blocks: Option<&crate::ir::BlockCodes>,
) -> std::result::Result<(), String> {
    use crate::ir::Stored;
    if tensor.numel() == 0 {
        return Ok(());
    }
    let words: Vec<u32> = match (stored, blocks) {
        (None, _) => vec![],
        (Some(Stored::Blocks(_)), Some(codes)) => codes.device_words(),
        (Some(Stored::Blocks(_)), None) => {
            return Err("its codes are missing (planner bug)".into());
        }
        (Some(Stored::Half(h)), _) => {
            let owned;
            let values: &[f32] = match tensor.as_f32() {
                Some(v) => v,
                None => {
                    owned = tensor.to_f32();
                    &owned
                }
            };
            (values.chunks(2))
                .map(|p| h.bits(p[0]) as u32 | (p.get(1).map_or(0, |&x| h.bits(x)) as u32) << 16)
                .collect()
        }
    };
    if stored.is_some() {
        let bytes = 4 * words.len() as u64;
        let mut view = buffer
            .slice(..bytes)
            .get_mapped_range_mut()
            .map_err(|e| format!("{e:?}"))?;
        view.copy_from_slice(bytemuck::cast_slice(&words));
        return Ok(());
    }
    let bytes = 4 * tensor.numel() as u64;
    let mut view = buffer
        .slice(..bytes)
        .get_mapped_range_mut()
        .map_err(|e| format!("{e:?}"))?;
    // Write-only memory (it may be write-combining): a copy in, never a read.
    view.copy_from_slice(&f32_bytes(tensor));
    Ok(())
}

/// `tensor`'s values as f32 bytes. f32 weights go in as their bytes: a weight still in the
/// model file's mapping is copied from there, never converted on the host (`F32Buf::le_bytes`).
fn f32_bytes(tensor: &crate::tensor::Tensor) -> std::borrow::Cow<'_, [u8]> {
    match &tensor.data {
        crate::tensor::Data::F32(values) => values.le_bytes(),
        _ => std::borrow::Cow::Owned(bytemuck::cast_slice(&tensor.to_f32()).to_vec()),
    }
}

/// Writes the f32 matrix `tensor` (`cols` columns) into `buffer`, which is mapped (at creation)
/// and zeroed, each row `pitch` elements after the one before (`storage::padded_rows`).
fn write_rows_mapped(
    buffer: &wgpu::Buffer,
    tensor: &crate::tensor::Tensor,
    cols: usize,
    pitch: usize,
) -> std::result::Result<(), String> {
    if tensor.numel() == 0 || cols == 0 {
        return Ok(());
    }
    // Into write-only memory, a copy per row, the padding left as created (zeros).
    let bytes = f32_bytes(tensor);
    let mut view = buffer
        .slice(..)
        .get_mapped_range_mut()
        .map_err(|e| format!("{e:?}"))?;
    let (row, stride) = (4 * cols, 4 * pitch);
    for (r, values) in bytes.chunks(row).enumerate() {
        view.slice(r * stride..r * stride + row)
            .copy_from_slice(values);
    }
    Ok(())
}

/// A kernel's pipeline and the layout of its one bind group.
type Built = (wgpu::ComputePipeline, wgpu::BindGroupLayout);

/// Threads that compile pipelines at most (besides the one creating the buffers).
const MAX_COMPILE_THREADS: usize = 7;

/// Creates the plan's allocations, writing the constants (the weights) into theirs, and the
/// staging buffers the outputs are read back through: one buffer per plan buffer (sharing
/// storage as the plan says) and one read-back per output.
fn create_buffers(
    gpu: &Gpu,
    plan: &Plan,
    graph: &Graph,
) -> Result<(Vec<wgpu::Buffer>, Vec<Readback>)> {
    let device = gpu.device();
    let uncaptured = gpu.uncaptured();
    let scopes = Scopes::push(device);
    // Constants (the weights) are written into their buffers, mapped at creation: on a CPU
    // driver straight into the device's memory, elsewhere through wgpu's staging buffer.
    let consts: HashMap<BufferId, NodeId> = plan
        .buffers
        .iter()
        .filter_map(|spec| match spec.role {
            BufferRole::Const(n) => Some((spec.storage, n)),
            _ => None,
        })
        .collect();
    let mut owned: HashMap<BufferId, wgpu::Buffer> = HashMap::new();
    for (owner, size) in plan.allocations() {
        let Some(spec) = plan.buffers.get(owner) else {
            return Err(Error::gpu(format!(
                "a plan buffer is stored in b{owner}, which does not exist (planner bug)"
            )));
        };
        let constant = consts.get(&owner).copied();
        let mut usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        if constant.is_some() && gpu.maps_storage() {
            usage |= wgpu::BufferUsages::MAP_WRITE;
        }
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(&spec.name),
            size,
            usage,
            mapped_at_creation: constant.is_some(),
        });
        if let Some(n) = constant {
            let tensor = graph.const_tensor(n).ok_or_else(|| {
                Error::graph(format!(
                    "plan buffer '{}' is a constant, but node {} is not",
                    spec.name,
                    n.index()
                ))
            })?;
            let result = match (spec.row_pitch, spec.shape.as_slice()) {
                (Some(pitch), &[_, cols]) => write_rows_mapped(&buffer, tensor, cols, pitch),
                _ => write_mapped(
                    &buffer,
                    tensor,
                    spec.stored,
                    graph.blocked().get(&n).map(|c| &**c),
                ),
            };
            buffer.unmap();
            result.map_err(|e| Error::gpu(format!("uploading '{}': {e}", spec.name)))?;
        }
        owned.insert(owner, buffer);
    }
    let buffers: Vec<wgpu::Buffer> = plan
        .buffers
        .iter()
        .map(|spec| owned[&spec.storage].clone())
        .collect();
    let outputs: Vec<Readback> = plan
        .outputs
        .iter()
        .map(|(name, b)| Readback {
            name: name.clone(),
            buffer: *b,
            len: plan.buffers[*b].len,
            staging: staging_buffer(device, &format!("readback {name}"), plan.buffers[*b].len),
        })
        .collect();
    scopes.check("creating buffers", &uncaptured)?;
    Ok((buffers, outputs))
}

/// The pipeline of one kernel (explicit layout: read-only inputs, one read-write output) and
/// the layout its bind groups follow.
fn build_pipeline(
    device: &wgpu::Device,
    k: &codegen::Kernel,
    cache: Option<&wgpu::PipelineCache>,
) -> (wgpu::ComputePipeline, wgpu::BindGroupLayout) {
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some(&k.name),
        source: wgpu::ShaderSource::Wgsl(k.source.as_str().into()),
    };
    // Without naga's loop bounding: it guards against a shader's infinite loop by threading a
    // counter through every loop, and that counter keeps LLVM-based drivers from unrolling the
    // kernels' fixed-count loops (the matmul's accumulators then stay in memory). Lavapipe
    // created the pipeline of MiniLM's 32 x 1536 x 384 product in 31 ms with it and 6-8 ms
    // without (Mesa's shader cache warm), and ran it in 2.06 against 1.37 ms. Bounds checks
    // stay on.
    let checks = wgpu::ShaderRuntimeChecks {
        force_loop_bounding: false,
        ..wgpu::ShaderRuntimeChecks::checked()
    };
    // SAFETY: the one check turned off is the loop bound, and every loop of dorac's kernels ends
    // by itself: each counts up by a positive step to a bound fixed when the kernel is
    // generated (a shape, at most a buffer's length), or halves a count down to zero
    // (CONTRIBUTING, "Loops").
    let module = unsafe { device.create_shader_module_trusted(desc, checks) };
    // One entry per binding: the inputs (a binding array counts its buffers), then the output
    // and the other values written.
    let inputs = k.input_bindings();
    let counts =
        (inputs.iter().map(|b| b.len())).chain(std::iter::repeat_n(1, 1 + k.also_writes.len()));
    let entries: Vec<wgpu::BindGroupLayoutEntry> = counts
        .enumerate()
        .map(|(i, n)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage {
                    read_only: i < inputs.len(),
                },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: (n > 1)
                .then(|| std::num::NonZeroU32::new(n as u32))
                .flatten(),
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
        cache,
    });
    (pipeline, bind_layout)
}

/// The bind group of one kernel: its buffers in binding order.
fn bind_kernel(
    device: &wgpu::Device,
    k: &codegen::Kernel,
    layout: &wgpu::BindGroupLayout,
    plan: &Plan,
    buffers: &[wgpu::Buffer],
) -> wgpu::BindGroup {
    // The value's own bytes at the start of its allocation, which may be larger.
    let binding = |b: BufferId| wgpu::BufferBinding {
        buffer: &buffers[b],
        offset: 0,
        size: NonZeroU64::new(plan.buffers[b].bytes()),
    };
    let arrays: Vec<Vec<wgpu::BufferBinding>> = (k.input_bindings().iter())
        .map(|b| b.iter().map(|&b| binding(b)).collect())
        .collect();
    let written: Vec<wgpu::BufferBinding> = k.written().map(binding).collect();
    let bind_entries: Vec<wgpu::BindGroupEntry> = (arrays.iter())
        .map(|a| match a.as_slice() {
            [one] => wgpu::BindingResource::Buffer(one.clone()),
            many => wgpu::BindingResource::BufferArray(many),
        })
        .chain(
            written
                .iter()
                .map(|w| wgpu::BindingResource::Buffer(w.clone())),
        )
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource,
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(&k.name),
        layout,
        entries: &bind_entries,
    })
}
