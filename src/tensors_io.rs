//! Named tensors on disk (safetensors) and atomic file writes. Everything dorac writes goes
//! through [`write_atomic`]: a temporary file in the target's folder, fsync, rename, so a killed
//! run never leaves a half-written output behind.

use crate::error::{Error, Result, Subject};
use crate::tensor::{Array, DType};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether a process with this id is running. Where that cannot be told (no `/proc`), every
/// process counts as running, so nothing of a live run is ever taken for stale.
pub fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// The process id in a temporary name dorac wrote (`...tmp-<pid>`, a file or a folder).
fn temp_owner(name: &str) -> Option<u32> {
    let (_, pid) = name.rsplit_once(".tmp-")?;
    pid.parse().ok()
}

/// Removes the temporary files and folders that killed dorac runs left in `dir` (every
/// writer names them `...tmp-<pid>`): those whose process is gone. Called before writing into
/// `dir`, so a killed run's leftovers last only until the next run writes there.
pub fn clean_stale_temps(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = temp_owner(&name) else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) {
            continue;
        }
        let path = e.path();
        let _ = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
    }
}

/// Writes `bytes` to `path` atomically (temporary file + rename in the same folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    clean_stale_temps(&dir);
    let file_name = path
        .file_name()
        .ok_or_else(|| Error::input_at(Subject::file(path), "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Tensors in name order, widened to f64 (float, integer and bool files are accepted; bools read
/// as 0/1). A 0-d tensor has shape `[]`.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Array>> {
    Ok(read_safetensors_typed(path)?
        .into_iter()
        .map(|(k, (a, _))| (k, a))
        .collect())
}

/// Whether a stored tensor held floats or integers (data checks need to know: class labels must
/// be integers, model inputs floats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    Float(&'static str),
    Int(&'static str),
}

impl Stored {
    pub fn name(self) -> &'static str {
        match self {
            Stored::Float(n) | Stored::Int(n) => n,
        }
    }
}

/// Like [`read_safetensors`], with each tensor's stored kind.
pub fn read_safetensors_typed(path: &Path) -> Result<BTreeMap<String, (Array, Stored)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_safetensors_typed(&bytes, &path.display().to_string())
}

/// [`read_safetensors_typed`] of a file's bytes; `what` names the file in errors.
pub fn parse_safetensors_typed(
    bytes: &[u8],
    what: &str,
) -> Result<BTreeMap<String, (Array, Stored)>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::input_at(
            Subject::context(what),
            format!("not a safetensors file ({e})"),
        )
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let stored = match view.dtype() {
            Dtype::F32 => Stored::Float("float32"),
            Dtype::F64 => Stored::Float("float64"),
            Dtype::F16 => Stored::Float("float16"),
            Dtype::BF16 => Stored::Float("bfloat16"),
            Dtype::I64 => Stored::Int("int64"),
            Dtype::I32 => Stored::Int("int32"),
            Dtype::I16 => Stored::Int("int16"),
            Dtype::I8 => Stored::Int("int8"),
            Dtype::U64 => Stored::Int("uint64"),
            Dtype::U32 => Stored::Int("uint32"),
            Dtype::U16 => Stored::Int("uint16"),
            Dtype::U8 => Stored::Int("uint8"),
            Dtype::BOOL => Stored::Int("bool"),
            _ => Stored::Int("other"),
        };
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
                .collect(),
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I16 => data
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
                .collect(),
            Dtype::I8 => data.iter().map(|&b| b as i8 as f64).collect(),
            Dtype::U64 => data
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::U32 => data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            Dtype::U16 => data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as f64)
                .collect(),
            Dtype::U8 => data.iter().map(|&b| b as f64).collect(),
            Dtype::BOOL => data.iter().map(|&b| (b != 0) as u8 as f64).collect(),
            other => {
                return Err(Error::input_at(Subject::context(what), format!("tensor '{name}' has dtype {other:?}; dorac reads float, integer and bool tensors")))
            }
        };
        out.insert(name, (Array::new(shape, values), stored));
    }
    Ok(out)
}

/// Writes f32 tensors (values rounded from f64) atomically.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Array>) -> Result<()> {
    let typed: BTreeMap<String, (Array, DType)> = tensors
        .iter()
        .map(|(k, a)| (k.clone(), (a.clone(), DType::F32)))
        .collect();
    write_safetensors_typed(path, &typed)
}

/// Writes tensors in their IR type atomically: float32 (rounded from f64), int64 (truncated) or
/// bool (nonzero is true).
pub fn write_safetensors_typed(
    path: &Path,
    tensors: &BTreeMap<String, (Array, DType)>,
) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>, Dtype)> = tensors
        .iter()
        .map(|(name, (a, dtype))| {
            let (b, st): (Vec<u8>, Dtype) = match dtype {
                DType::F32 => (
                    a.data
                        .iter()
                        .flat_map(|&v| (v as f32).to_le_bytes())
                        .collect(),
                    Dtype::F32,
                ),
                DType::I64 => (
                    a.data
                        .iter()
                        .flat_map(|&v| (v as i64).to_le_bytes())
                        .collect(),
                    Dtype::I64,
                ),
                DType::Bool => (
                    a.data.iter().map(|&v| (v != 0.0) as u8).collect(),
                    Dtype::BOOL,
                ),
            };
            (name.clone(), a.shape.clone(), b, st)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, b, st)| {
            safetensors::tensor::TensorView::new(*st, shape.clone(), b)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::input_at(Subject::named("tensor", name), format!("{e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let encoded = safetensors::serialize(views, None)
        .map_err(|e| Error::input_at(Subject::file(path), format!("{e}")))?;
    write_atomic(path, &encoded)
}

/// Checks a tensor's shape against what a model expects, naming both.
pub fn expect_shape(what: &str, name: &str, got: &[usize], want: &[usize]) -> Result<()> {
    if got != want {
        return Err(Error::shape_mismatch(
            Subject::context(format!("{what} '{name}'")),
            got,
            want,
        ));
    }
    Ok(())
}
