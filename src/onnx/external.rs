//! Writing a model with its large tensors in an external data file (ONNX's `data_location =
//! EXTERNAL`, entries `location`, `offset`, `length`), as exporters do for models over
//! protobuf's 2 GiB limit and as `torch.onnx` does by default for large ones.
//!
//! The tensor bytes stream from the IR's memory (often a map of the input's own data file)
//! straight into the data file, so the protobuf in memory holds only the graph and the small
//! tensors: writing a 650 MB model costs a few MB of memory, not two copies of it.

use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::{StringStringEntryProto, TensorProto};
use crate::error::{Error, Result, Subject};
use crate::tensor::{Data, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Tensors of at least this many bytes go to the data file (onnx's `size_threshold` default).
pub const EXTERNAL_MIN_BYTES: usize = 1024;

/// Offsets of tensors in the data file are multiples of this (page-aligned, so readers can map
/// each tensor directly).
const ALIGN: u64 = 4096;

/// The data file being written, and where the next tensor goes.
pub(crate) struct ExternalData {
    /// The data file's name as the model refers to it (relative to the model's folder).
    location: String,
    /// Where it is written until it is complete (renamed to `final_path` then).
    tmp: PathBuf,
    final_path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    offset: u64,
}

impl ExternalData {
    /// Starts `<model>.data` beside `model` (written to a temporary file first).
    pub(crate) fn create(model: &Path) -> Result<ExternalData> {
        let name = model
            .file_name()
            .ok_or_else(|| Error::input_at(Subject::file(model), "not a file path"))?;
        let mut data_name = name.to_os_string();
        data_name.push(".data");
        let final_path = model.with_file_name(&data_name);
        let mut tmp_name = data_name.clone();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = model.with_file_name(tmp_name);
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(ExternalData {
            location: data_name.to_string_lossy().into_owned(),
            tmp,
            final_path,
            file: std::io::BufWriter::with_capacity(1 << 20, file),
            offset: 0,
        })
    }

    /// Writes `t`'s bytes (little-endian, like `raw_data`) at the next aligned offset and returns
    /// the initializer that refers to them.
    pub(crate) fn write(&mut self, name: &str, t: &Tensor) -> Result<TensorProto> {
        let pad = self.offset.next_multiple_of(ALIGN) - self.offset;
        let io = |e| Error::io(&self.tmp, e);
        self.file.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        self.offset += pad;
        let (data_type, length) = match &t.data {
            Data::F32(v) => {
                // The bytes as they are (a weight still in the input's mapping is not converted).
                let bytes = v.le_bytes();
                self.file.write_all(&bytes).map_err(io)?;
                (DataType::Float, bytes.len() as u64)
            }
            Data::I64(v) => (DataType::Int64, write_le(&mut self.file, v).map_err(io)?),
            Data::Bool(v) => {
                let bytes: Vec<u8> = v.iter().map(|&b| b as u8).collect();
                self.file.write_all(&bytes).map_err(io)?;
                (DataType::Bool, bytes.len() as u64)
            }
        };
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value),
        };
        let proto = TensorProto {
            name: Some(name.to_string()),
            dims: t.shape.iter().map(|&d| d as i64).collect(),
            data_type: Some(data_type as i32),
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", self.offset.to_string()),
                entry("length", length.to_string()),
            ],
            ..Default::default()
        };
        self.offset += length;
        Ok(proto)
    }

    /// Writes `bytes` (the tensor `template` describes: its name, dims and type) at the next
    /// aligned offset and returns the initializer that refers to them.
    pub(crate) fn write_raw(
        &mut self,
        template: &TensorProto,
        bytes: &[u8],
    ) -> Result<TensorProto> {
        let pad = self.offset.next_multiple_of(ALIGN) - self.offset;
        let io = |e| Error::io(&self.tmp, e);
        self.file.write_all(&vec![0u8; pad as usize]).map_err(io)?;
        self.file.write_all(bytes).map_err(io)?;
        self.offset += pad;
        let entry = |key: &str, value: String| StringStringEntryProto {
            key: Some(key.into()),
            value: Some(value),
        };
        let proto = TensorProto {
            name: template.name.clone(),
            dims: template.dims.clone(),
            data_type: template.data_type,
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                entry("location", self.location.clone()),
                entry("offset", self.offset.to_string()),
                entry("length", bytes.len().to_string()),
            ],
            ..Default::default()
        };
        self.offset += bytes.len() as u64;
        Ok(proto)
    }

    /// Flushes and syncs the data file and renames it into place. Call after the model itself
    /// is written (to its own temporary file) and before that is renamed.
    pub(crate) fn finish(self) -> Result<()> {
        let ExternalData {
            tmp,
            final_path,
            file,
            ..
        } = self;
        let result = (|| {
            let file = file.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            std::fs::rename(&tmp, &final_path)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(&final_path, e)
        })
    }

    /// Removes the temporary data file (after a failure).
    pub(crate) fn abandon(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Writes `values` little-endian; returns the byte count.
fn write_le<T: bytemuck::Pod + ToLe>(w: &mut impl Write, values: &[T]) -> std::io::Result<u64> {
    if cfg!(target_endian = "little") {
        w.write_all(bytemuck::cast_slice(values))?;
    } else {
        for v in values {
            w.write_all(&v.le_bytes())?;
        }
    }
    Ok(std::mem::size_of_val(values) as u64)
}

/// Little-endian bytes of one value (the big-endian fallback of [`write_le`]).
pub(crate) trait ToLe {
    fn le_bytes(&self) -> Vec<u8>;
}

impl ToLe for f32 {
    fn le_bytes(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}

impl ToLe for i64 {
    fn le_bytes(&self) -> Vec<u8> {
        self.to_le_bytes().to_vec()
    }
}
