//! Execution on wgpu: a [`Gpu`] (adapter, device, queue) and an [`Executable`] (a
//! [`Plan`](crate::codegen::Plan) turned into pipelines and buffers, ready to run many times).
//!
//! Every wgpu failure becomes an [`Error::Gpu`] with context, never a panic: operations run
//! inside device error scopes, and anything that escapes them lands in an uncaptured-error
//! handler whose messages are reported by the next check.
//!
//! No adapter is a case of its own: [`Gpu::new`] then fails with [`Error::NoAdapter`], so the
//! CLI can fall back to the reference executor on exactly that error and report every other
//! one.

mod executable;
mod pipeline_cache;

pub use executable::{BuildTimes, Executable};
pub use pipeline_cache::CACHE_DIR_ENV;

use crate::error::{Error, Result, Subject};
use crate::ir::Graph;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What to tell a user who has no adapter.
pub const INSTALL_HINT: &str = "install a Vulkan driver: `scripts/install-vulkan.sh`, or on \
     Debian/Ubuntu `apt-get install mesa-vulkan-drivers` (lavapipe, a software Vulkan driver)";

/// True when `e` is [`Gpu::new`]'s "no adapter" error (and not, say, a device or shader error).
pub fn is_no_adapter(e: &Error) -> bool {
    matches!(e, Error::NoAdapter { .. })
}

/// The wgpu features a kernel needs to bind arrays of storage buffers.
const BINDING_ARRAYS: wgpu::Features =
    wgpu::Features::BUFFER_BINDING_ARRAY.union(wgpu::Features::STORAGE_RESOURCE_BINDING_ARRAY);

/// An open GPU: the adapter's device and queue, with the adapter's own limits.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    uncaptured: Arc<Mutex<Vec<String>>>,
    pipeline_cache: Option<pipeline_cache::DiskCache>,
}

impl Gpu {
    /// Opens the first adapter wgpu finds (high-performance preferred). `backend` restricts the
    /// search to one of `vulkan`, `metal`, `dx12`, `gl`; `None` uses wgpu's default backends
    /// (which the `WGPU_BACKEND` environment variable can override), looking at GL only when
    /// Vulkan, Metal and DX12 have no adapter.
    ///
    /// The device is created with the adapter's real limits, not WebGPU's defaults, so buffers
    /// up to what the hardware allows work. Fails with a [`NO_ADAPTER`] error when no adapter
    /// exists.
    pub fn new(backend: Option<&str>) -> Result<Gpu> {
        let chosen = match backend {
            Some(name) => parse_backend(name)?,
            None => wgpu::InstanceDescriptor::new_without_display_handle_from_env().backends,
        };
        let which = match backend {
            Some(name) => format!("backend {name}"),
            None => format!("backends {chosen:?}"),
        };
        // Unless told which, the native APIs first and GL only where none of them has an
        // adapter: starting GL (EGL and its driver) takes as long as opening lavapipe itself,
        // 15 ms of a 0.3 s run, and a GPU with a native API is what `HighPerformance` would
        // pick anyway.
        let told = backend.is_some() || wgpu::Backends::from_env().is_some();
        let tries = if told {
            vec![chosen]
        } else {
            vec![
                chosen & wgpu::Backends::PRIMARY,
                chosen & wgpu::Backends::SECONDARY,
            ]
        };
        let mut failure = String::new();
        let mut found = None;
        for backends in tries.into_iter().filter(|b| !b.is_empty()) {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
            desc.backends = backends;
            let instance = wgpu::Instance::new(desc);
            let request = instance.request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            });
            match pollster::block_on(request) {
                Ok(adapter) => {
                    found = Some(adapter);
                    break;
                }
                Err(e) => failure = e.to_string(),
            }
        }
        let adapter = found.ok_or(Error::NoAdapter {
            backends: which,
            reason: failure,
        })?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let mappable = if info.device_type == wgpu::DeviceType::Cpu {
            wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
        } else {
            wgpu::Features::empty()
        };
        let optional =
            wgpu::Features::PIPELINE_CACHE | mappable | BINDING_ARRAYS | wgpu::Features::SUBGROUP;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("dorac"),
            // Optional features, where the adapter has them: an on-disk pipeline cache, arrays of
            // storage buffers (`PlanOptions::binding_arrays`), subgroup operations
            // (`PlanOptions::subgroup_size`) and, on a CPU driver, storage buffers the host may
            // map (see `Gpu::maps_storage`).
            required_features: adapter.features() & optional,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::gpu(format!("opening a device on {}: {e}", info.name)))?;
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let sink = uncaptured.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut v) = sink.lock() {
                v.push(format!("device lost ({reason:?}): {message}"));
            }
        });
        let pipeline_cache = pipeline_cache::DiskCache::open(&device, &info);
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            uncaptured,
            pipeline_cache,
        })
    }

    /// `llvmpipe (LLVM 15.0.6, 256 bits) on Vulkan, driver llvmpipe (Mesa 25.0.7)`: what ran the
    /// kernels, for logs and benchmark reports.
    pub fn describe(&self) -> String {
        let i = &self.info;
        let mut s = format!("{} on {}", i.name, i.backend);
        if !i.driver.is_empty() {
            s += &format!(", driver {}", i.driver);
            if !i.driver_info.is_empty() {
                s += &format!(" ({})", i.driver_info);
            }
        }
        s
    }

    /// The kind of kernels this adapter runs best (a CPU driver gets its own matmul shape).
    pub fn target(&self) -> crate::codegen::Target {
        crate::codegen::Target::for_adapter(self.info.device_type)
    }

    /// Plan options for kernels made for this device: its target, and as many storage
    /// bindings per kernel as it allows.
    pub fn plan_options(&self) -> crate::codegen::PlanOptions {
        crate::codegen::PlanOptions {
            target: self.target(),
            max_bindings: self.limits.max_storage_buffers_per_shader_stage as usize,
            binding_arrays: self.binds_arrays(),
            subgroup_size: self.subgroup_size(),
            max_buffer_bytes: self.limits.max_storage_buffer_binding_size,
            ..Default::default()
        }
    }

    /// The subgroup size every kernel runs with, where the device has subgroup operations and
    /// one size (lavapipe: 8, the lanes of a 256-bit register); None otherwise.
    pub fn subgroup_size(&self) -> Option<u32> {
        let (min, max) = (self.info.subgroup_min_size, self.info.subgroup_max_size);
        (self.device.features().contains(wgpu::Features::SUBGROUP) && min == max).then_some(min)
    }

    /// The device's limits (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    pub(crate) fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// True when kernels may bind arrays of storage buffers (`PlanOptions::binding_arrays`).
    pub fn binds_arrays(&self) -> bool {
        self.device.features().contains(BINDING_ARRAYS)
    }

    /// True when storage buffers may also be mapped for writing (a CPU driver, whose device
    /// memory is the host's): the weights are then written straight into their buffers, with
    /// no staging copy. On a discrete GPU a mappable buffer would live in slower host memory.
    pub(crate) fn maps_storage(&self) -> bool {
        (self.device.features()).contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
    }

    pub(crate) fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The pipeline cache new pipelines go into, if this device has one.
    pub(crate) fn pipeline_cache(&self) -> Option<&wgpu::PipelineCache> {
        self.pipeline_cache.as_ref().map(|c| &c.cache)
    }

    /// Saves the pipeline cache for the next run (after new pipelines were built).
    pub(crate) fn save_pipeline_cache(&self) {
        if let Some(c) = &self.pipeline_cache {
            c.save();
        }
    }

    pub(crate) fn uncaptured(&self) -> Arc<Mutex<Vec<String>>> {
        self.uncaptured.clone()
    }
}

fn parse_backend(name: &str) -> Result<wgpu::Backends> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "vulkan" | "vk" => wgpu::Backends::VULKAN,
        "metal" | "mtl" => wgpu::Backends::METAL,
        "dx12" | "d3d12" => wgpu::Backends::DX12,
        "gl" | "gles" | "opengl" => wgpu::Backends::GL,
        other => {
            return Err(Error::input(format!(
                "unknown GPU backend '{other}' (expected vulkan, metal, dx12 or gl)"
            )))
        }
    })
}

/// Plans `graph`, builds it and runs it once: the one-call path for the CLI and tests. Inputs
/// and outputs are flat row-major f32, keyed by graph input and output name.
pub fn run_graph(
    gpu: &Gpu,
    graph: &Graph,
    inputs: &HashMap<String, Vec<f32>>,
) -> Result<HashMap<String, Vec<f32>>> {
    Executable::compile(gpu, graph)?.run(inputs)
}

/// Error scopes for all three filters around a stretch of wgpu calls. wgpu reports most errors
/// asynchronously through scopes; popping them turns whatever was caught into an [`Error::Gpu`].
/// Scopes are per thread, so push and check on the same thread.
struct Scopes(Vec<wgpu::ErrorScopeGuard>);

impl Scopes {
    fn push(device: &wgpu::Device) -> Scopes {
        Scopes(vec![
            device.push_error_scope(wgpu::ErrorFilter::OutOfMemory),
            device.push_error_scope(wgpu::ErrorFilter::Validation),
            device.push_error_scope(wgpu::ErrorFilter::Internal),
        ])
    }

    /// Pops the scopes; any error caught (or reported as uncaptured meanwhile) fails with
    /// `context` in front.
    fn check(self, context: &str, uncaptured: &Mutex<Vec<String>>) -> Result<()> {
        let mut errors = Vec::new();
        for guard in self.0.into_iter().rev() {
            if let Some(e) = pollster::block_on(guard.pop()) {
                errors.push(match e {
                    wgpu::Error::OutOfMemory { .. } => "out of GPU memory".to_string(),
                    other => other.to_string(),
                });
            }
        }
        if let Ok(mut u) = uncaptured.lock() {
            errors.append(&mut u);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::gpu_at(
                Subject::context(context),
                errors.join("; ").to_string(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names() {
        assert_eq!(parse_backend("Vulkan").unwrap(), wgpu::Backends::VULKAN);
        assert_eq!(parse_backend("gl").unwrap(), wgpu::Backends::GL);
        assert!(parse_backend("cuda").is_err());
    }

    #[test]
    fn no_adapter_is_recognised_by_its_variant() {
        let e = Error::NoAdapter {
            backends: "vulkan".into(),
            reason: "none".into(),
        };
        assert!(is_no_adapter(&e));
        assert!(e
            .to_string()
            .starts_with("gpu: no GPU adapter found (vulkan: none)"));
        // Not by the text of another error.
        assert!(!is_no_adapter(&Error::gpu("no GPU adapter found")));
        assert!(!is_no_adapter(&Error::input("no GPU adapter found")));
    }
}
