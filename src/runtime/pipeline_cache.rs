//! The driver's compiled pipelines kept on disk between runs (wgpu's `PipelineCache`, on
//! backends that have one: Vulkan), so that a second run of the same model starts faster.
//!
//! One file per adapter, named by `wgpu::util::pipeline_cache_key`, in `$DORAC_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/dorac`, else `$HOME/.cache/dorac`; `DORAC_CACHE_DIR=off` turns it off. The
//! file is only an accelerator: one that is missing, unreadable, from another driver version or
//! corrupt is ignored (the driver checks the data it is given, and wgpu falls back to an empty
//! cache), and failing to write it is not an error. It is written to a temporary file and
//! renamed, so a killed run never leaves half a cache.

use std::path::{Path, PathBuf};

/// Environment variable naming the cache folder (`off`: no cache).
pub const CACHE_DIR_ENV: &str = "DORAC_CACHE_DIR";

/// A pipeline cache and the file it was read from and is saved to.
pub(crate) struct DiskCache {
    pub(crate) cache: wgpu::PipelineCache,
    path: PathBuf,
}

impl DiskCache {
    /// Opens the cache for `info`'s adapter, seeded from its file when there is one. `None`
    /// when the device lacks `PIPELINE_CACHE`, the backend has no cache key, or caching is off.
    pub(crate) fn open(device: &wgpu::Device, info: &wgpu::AdapterInfo) -> Option<DiskCache> {
        if !device.features().contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let path = cache_dir()?.join(wgpu::util::pipeline_cache_key(info)?);
        let data = std::fs::read(&path).ok();
        // SAFETY: the data is only ever what `get_data` returned for an adapter with this key
        // (or a file that is not: `fallback` makes the driver's own checks reject it).
        let cache = unsafe {
            device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                label: Some("dorac pipelines"),
                data: data.as_deref(),
                fallback: true,
            })
        };
        Some(DiskCache { cache, path })
    }

    /// Writes the cache's current data to its file (temporary file, then rename). Errors are
    /// ignored: a cache that cannot be saved only makes the next start slower.
    pub(crate) fn save(&self) {
        let Some(data) = self.cache.get_data() else {
            return;
        };
        let _ = write_atomically(&self.path, &data);
    }
}

fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os(CACHE_DIR_ENV) {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(|v| PathBuf::from(v).join("dorac"))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/dorac"))),
    }
}

fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // Unique per process and per save: threads of one process may save at once.
    static SAVES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SAVES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.{}.{n}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("cache"),
        std::process::id()
    ));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
