//! Tensor payloads: ONNX `TensorProto` <-> [`Tensor`], including external data files.
//!
//! Import accepts float32, float64, float16 and bfloat16 (all become f32), int64, int32, int16,
//! int8, uint16 and uint8 (all become i64) and bool, from `raw_data` (little-endian), from the
//! typed fields, or from an external file next to the model. Export always writes `raw_data`.

use super::proto::tensor_proto::{DataLocation, DataType};
use super::proto::TensorProto;
use crate::error::{Error, Result, Subject};
use crate::tensor::{numel, DType, Data, Tensor};
use std::path::{Component, Path, PathBuf};

/// The dtypes dorac reads, with their byte size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Elem {
    F32,
    F64,
    F16,
    Bf16,
    I64,
    I32,
    I16,
    U16,
    U32,
    U64,
    I8,
    U8,
    /// Two 4-bit codes a byte, the first in the low bits.
    I4,
    U4,
    Bool,
}

impl Elem {
    fn of(data_type: i32) -> Option<Elem> {
        Some(match DataType::try_from(data_type).ok()? {
            DataType::Float => Elem::F32,
            DataType::Double => Elem::F64,
            DataType::Float16 => Elem::F16,
            DataType::Bfloat16 => Elem::Bf16,
            DataType::Int64 => Elem::I64,
            DataType::Int32 => Elem::I32,
            DataType::Int16 => Elem::I16,
            DataType::Uint16 => Elem::U16,
            DataType::Uint32 => Elem::U32,
            DataType::Uint64 => Elem::U64,
            DataType::Int8 => Elem::I8,
            DataType::Uint8 => Elem::U8,
            DataType::Int4 => Elem::I4,
            DataType::Uint4 => Elem::U4,
            DataType::Bool => Elem::Bool,
            _ => return None,
        })
    }

    /// The bytes `n` elements take.
    fn bytes(self, n: usize) -> usize {
        match self {
            Elem::F32 | Elem::I32 | Elem::U32 => 4 * n,
            Elem::F64 | Elem::I64 | Elem::U64 => 8 * n,
            Elem::F16 | Elem::Bf16 | Elem::I16 | Elem::U16 => 2 * n,
            Elem::I8 | Elem::U8 | Elem::Bool => n,
            Elem::I4 | Elem::U4 => n.div_ceil(2),
        }
    }

    fn dtype(self) -> DType {
        match self {
            Elem::F32 | Elem::F64 | Elem::F16 | Elem::Bf16 => DType::F32,
            Elem::I64
            | Elem::I32
            | Elem::I16
            | Elem::U16
            | Elem::U32
            | Elem::U64
            | Elem::I8
            | Elem::U8
            | Elem::I4
            | Elem::U4 => DType::I64,
            Elem::Bool => DType::Bool,
        }
    }
}

/// The IR type of an ONNX element type, or None when dorac does not read it.
pub(crate) fn ir_dtype(data_type: i32) -> Option<DType> {
    Elem::of(data_type).map(Elem::dtype)
}

/// The name ONNX gives a `data_type` value, for messages.
pub(crate) fn dtype_name(data_type: i32) -> String {
    match DataType::try_from(data_type) {
        Ok(t) => t.as_str_name().to_lowercase(),
        Err(_) => format!("data type {data_type}"),
    }
}

/// Decodes a tensor. `model_dir` is where external data files are looked up; `what` names the
/// tensor in errors ("initializer 'w'", "the value of Constant node 'c'").
pub(crate) fn tensor_from_proto(t: &TensorProto, model_dir: &Path, what: &str) -> Result<Tensor> {
    let err = |msg: String| Error::onnx_at(Subject::context(what), msg.to_string());
    let elem = Elem::of(t.data_type()).ok_or_else(|| {
        err(format!(
            "{} tensors are not supported (dorac reads float32, float64, float16, bfloat16, \
             int64, int32, int16, int8, int4, uint16, uint8, uint4 and bool)",
            dtype_name(t.data_type())
        ))
    })?;
    if t.segment.is_some() {
        return Err(err("segmented tensors are not supported".into()));
    }
    // Before anything is mapped or allocated: `elem.bytes(n)` below cannot overflow after this.
    let shape = checked_dims(t, what, &err)?;
    let n = numel(&shape);
    let external = t.data_location() == DataLocation::External;
    let mapped;
    let raw: Option<&[u8]> = if external {
        let (map, offset) = map_external(t, model_dir, elem.bytes(n), &err)?;
        // float32 weights are used in place from the mapping; other types are converted.
        if let Elem::F32 = elem {
            if let Some(buf) = crate::tensor::F32Buf::mapped(map.clone(), offset, n) {
                return Ok(Tensor {
                    shape,
                    data: Data::F32(buf),
                });
            }
        }
        mapped = (map, offset);
        Some(&mapped.0[mapped.1..mapped.1 + elem.bytes(n)])
    } else {
        // float32 `raw_data` (a slice of the mapped model file) is kept as its bytes: the
        // device upload copies them, and only a host reader converts (`F32Buf::Raw`).
        if let (Elem::F32, Some(bytes)) = (&elem, &t.raw_data) {
            if bytes.len() == elem.bytes(n) {
                if let Some(buf) = crate::tensor::F32Buf::raw(bytes.clone()) {
                    return Ok(Tensor {
                        shape,
                        data: Data::F32(buf),
                    });
                }
            }
        }
        t.raw_data.as_deref()
    };
    let data = match raw {
        Some(bytes) => {
            if bytes.len() != elem.bytes(n) {
                return Err(err(format!(
                    "raw data has {} bytes, but shape {:?} of {} needs {}",
                    bytes.len(),
                    shape,
                    dtype_name(t.data_type()),
                    elem.bytes(n)
                )));
            }
            from_le_bytes(elem, bytes, n)
        }
        None => from_typed_fields(elem, t, n).map_err(err)?,
    };
    Ok(Tensor { shape, data })
}

fn from_le_bytes(elem: Elem, b: &[u8], n: usize) -> Data {
    let chunks = b.chunks_exact(elem.bytes(1).max(1));
    match elem {
        Elem::F32 => Data::F32(
            chunks
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        Elem::F64 => Data::F32(
            chunks
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
        ),
        Elem::F16 => Data::F32(
            chunks
                .map(|c| f16_to_f32(u16::from_le_bytes(c.try_into().unwrap())))
                .collect(),
        ),
        Elem::Bf16 => Data::F32(
            chunks
                .map(|c| bf16_to_f32(u16::from_le_bytes(c.try_into().unwrap())))
                .collect(),
        ),
        Elem::I64 => Data::I64(
            chunks
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        ),
        Elem::I32 => Data::I64(
            chunks
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        Elem::I16 => Data::I64(
            chunks
                .map(|c| i16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        Elem::U16 => Data::I64(
            chunks
                .map(|c| u16::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        Elem::U32 => Data::I64(
            chunks
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        // Values above i64::MAX wrap; the device holds integers exactly only below 2^24 anyway.
        Elem::U64 => Data::I64(
            chunks
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
        ),
        Elem::I8 => Data::I64(b.iter().map(|&x| x as i8 as i64).collect()),
        Elem::U8 => Data::I64(b.iter().map(|&x| x as i64).collect()),
        Elem::I4 | Elem::U4 => Data::I64(unpack_4bit(elem, b, n).collect()),
        Elem::Bool => Data::Bool(b.iter().map(|&x| x != 0).collect()),
    }
}

/// The `n` codes of packed 4-bit bytes, the low half of each byte first; int4 is two's
/// complement.
fn unpack_4bit(elem: Elem, bytes: &[u8], n: usize) -> impl Iterator<Item = i64> + '_ {
    (0..n).map(move |i| {
        let nibble = (bytes[i / 2] >> (4 * (i % 2))) & 0x0f;
        match elem {
            Elem::I4 => ((nibble << 4) as i8 >> 4) as i64,
            _ => nibble as i64,
        }
    })
}

fn from_typed_fields(elem: Elem, t: &TensorProto, n: usize) -> std::result::Result<Data, String> {
    let check = |field: &str, len: usize| {
        if len == n {
            Ok(())
        } else {
            Err(format!(
                "{field} has {len} values, but shape {:?} needs {n}",
                t.dims
            ))
        }
    };
    Ok(match elem {
        Elem::F32 => {
            check("float_data", t.float_data.len())?;
            Data::F32(t.float_data.clone().into())
        }
        Elem::F64 => {
            check("double_data", t.double_data.len())?;
            Data::F32(t.double_data.iter().map(|&x| x as f32).collect())
        }
        // float16 and bfloat16 travel as their 16 bits in int32_data.
        Elem::F16 => {
            check("int32_data", t.int32_data.len())?;
            Data::F32(t.int32_data.iter().map(|&x| f16_to_f32(x as u16)).collect())
        }
        Elem::Bf16 => {
            check("int32_data", t.int32_data.len())?;
            Data::F32(
                t.int32_data
                    .iter()
                    .map(|&x| bf16_to_f32(x as u16))
                    .collect(),
            )
        }
        Elem::I64 => {
            check("int64_data", t.int64_data.len())?;
            Data::I64(t.int64_data.clone().into())
        }
        // The narrower integer types and bool also travel in int32_data.
        Elem::I32 | Elem::I16 | Elem::U16 | Elem::I8 | Elem::U8 => {
            check("int32_data", t.int32_data.len())?;
            Data::I64(t.int32_data.iter().map(|&x| x as i64).collect())
        }
        // uint32 and uint64 travel in uint64_data.
        Elem::U32 | Elem::U64 => {
            check("uint64_data", t.uint64_data.len())?;
            Data::I64(t.uint64_data.iter().map(|&x| x as i64).collect())
        }
        // int4 and uint4 travel as their packed bytes in int32_data.
        Elem::I4 | Elem::U4 => {
            let bytes: Vec<u8> = t.int32_data.iter().map(|&x| x as u8).collect();
            if bytes.len() != n.div_ceil(2) {
                return Err(format!(
                    "int32_data has {} values, but shape {:?} needs {} (two codes each)",
                    bytes.len(),
                    t.dims,
                    n.div_ceil(2)
                ));
            }
            Data::I64(unpack_4bit(elem, &bytes, n).collect())
        }
        Elem::Bool => {
            check("int32_data", t.int32_data.len())?;
            Data::Bool(t.int32_data.iter().map(|&x| x != 0).collect())
        }
    })
}

fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

fn bf16_to_f32(h: u16) -> f32 {
    half::bf16::from_bits(h).to_f32()
}

/// A tensor's dims, none negative, and few enough elements that their bytes fit in memory.
fn checked_dims(t: &TensorProto, what: &str, err: &dyn Fn(String) -> Error) -> Result<Vec<usize>> {
    let shape = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| err(format!("negative dim {d} in {:?}", t.dims))))
        .collect::<Result<Vec<usize>>>()?;
    crate::tensor::check_size(&shape, 8, || what.to_string())?;
    Ok(shape)
}

/// The bytes of an external-data tensor of any element type dorac reads (`map_external`'s
/// checks): the mapping of its file and the tensor's range in it.
pub(crate) fn external_bytes(
    t: &TensorProto,
    model_dir: &Path,
    what: &str,
) -> Result<(std::sync::Arc<memmap2::Mmap>, std::ops::Range<usize>)> {
    let err = |msg: String| Error::onnx_at(Subject::context(what), msg);
    let elem = Elem::of(t.data_type()).ok_or_else(|| {
        err(format!(
            "{} tensors are not supported",
            dtype_name(t.data_type())
        ))
    })?;
    let shape = checked_dims(t, what, &err)?;
    let len = elem.bytes(numel(&shape));
    let (map, offset) = map_external(t, model_dir, len, &err)?;
    Ok((map, offset..offset + len))
}

/// Memory-maps an external-data tensor's file; returns the mapping and the tensor's offset.
/// The location must stay inside the model's folder: an absolute path, a `..` component, or a
/// symlink that resolves outside is refused, because a model file is untrusted input and must
/// not make dorac read arbitrary files.
fn map_external(
    t: &TensorProto,
    model_dir: &Path,
    expected: usize,
    err: &dyn Fn(String) -> Error,
) -> Result<(std::sync::Arc<memmap2::Mmap>, usize)> {
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for kv in &t.external_data {
        let parse = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| err(format!("external data {} '{v}' is not a number", kv.key())))
        };
        match kv.key() {
            "location" => location = Some(kv.value().to_string()),
            "offset" => offset = parse(kv.value())?,
            "length" => length = Some(parse(kv.value())?),
            _ => {}
        }
    }
    let location =
        location.ok_or_else(|| err("external data without a 'location' entry".into()))?;
    let path = safe_external_path(model_dir, &location).map_err(err)?;
    if let Some(len) = length {
        if len != expected as u64 {
            return Err(err(format!(
                "external data length {len} does not match the tensor's {expected} bytes"
            )));
        }
    }
    // Only a plain file is read: opening a FIFO would block for ever, a device could be read
    // without end, and a file with other hard links may be a file outside the model's folder.
    let meta = std::fs::metadata(&path).map_err(|e| {
        err(format!(
            "cannot open external data file {}: {e}",
            path.display()
        ))
    })?;
    if !meta.is_file() {
        return Err(err(format!(
            "external data {} is not a regular file",
            path.display()
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if meta.nlink() > 1 {
            return Err(err(format!(
                "external data file {} has {} hard links; dorac reads only files that have one, \
                 since another link may lie outside the model's folder",
                path.display(),
                meta.nlink()
            )));
        }
    }
    let f = std::fs::File::open(&path).map_err(|e| {
        err(format!(
            "cannot open external data file {}: {e}",
            path.display()
        ))
    })?;
    let size = f
        .metadata()
        .map_err(|e| {
            err(format!(
                "cannot read external data file {}: {e}",
                path.display()
            ))
        })?
        .len();
    let end = offset.checked_add(expected as u64);
    if end.is_none_or(|end| end > size) {
        return Err(err(format!(
            "external data file {} has {size} bytes, but the tensor needs bytes {offset}..{} \
             (the file is short or the offset is wrong)",
            path.display(),
            offset as u128 + expected as u128
        )));
    }
    // SAFETY: the mapping is read-only; like every reader of a model file, dorac assumes the
    // file is not truncated or rewritten while it runs.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| {
        err(format!(
            "cannot map external data file {}: {e}",
            path.display()
        ))
    })?;
    Ok((std::sync::Arc::new(map), offset as usize))
}

/// Resolves `location` under `model_dir`, refusing anything that could leave the folder.
fn safe_external_path(model_dir: &Path, location: &str) -> std::result::Result<PathBuf, String> {
    let loc = Path::new(location);
    if location.is_empty() {
        return Err("external data location is empty".into());
    }
    if loc.is_absolute() || loc.has_root() {
        return Err(format!(
            "external data location '{location}' is an absolute path; dorac reads external data \
             only from files inside the model's folder"
        ));
    }
    for c in loc.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!(
                    "external data location '{location}' leaves the model's folder ('..'); dorac \
                     reads external data only from files inside it"
                ))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "external data location '{location}' is an absolute path; dorac reads \
                     external data only from files inside the model's folder"
                ))
            }
        }
    }
    let dir = if model_dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        model_dir
    };
    let full = dir.join(loc);
    let canon_dir = dir
        .canonicalize()
        .map_err(|e| format!("cannot resolve the model's folder {}: {e}", dir.display()))?;
    let canon = full
        .canonicalize()
        .map_err(|e| format!("cannot open external data file {}: {e}", full.display()))?;
    if !canon.starts_with(&canon_dir) {
        return Err(format!(
            "external data location '{location}' resolves to {}, outside the model's folder {} \
             (through a symlink); dorac reads external data only from files inside it",
            canon.display(),
            canon_dir.display()
        ));
    }
    Ok(canon)
}

/// Encodes a tensor as an initializer with `raw_data` (little-endian).
pub(crate) fn tensor_to_proto(name: &str, t: &Tensor) -> TensorProto {
    // On a little-endian host the values' memory is their raw_data: one copy, not one push per
    // byte.
    let le = cfg!(target_endian = "little");
    let (data_type, raw): (DataType, Vec<u8>) = match &t.data {
        // Bytes still in the input model's mapping go out as they are: shared, not copied.
        Data::F32(crate::tensor::F32Buf::Raw(raw)) => {
            return proto_with_raw(name, t, DataType::Float, raw.bytes.clone());
        }
        Data::F32(v) => (DataType::Float, v.le_bytes().into_owned()),
        Data::I64(v) if le => (DataType::Int64, bytemuck::cast_slice(v).to_vec()),
        Data::I64(v) => (
            DataType::Int64,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ),
        Data::Bool(v) => (DataType::Bool, v.iter().map(|&x| x as u8).collect()),
    };
    proto_with_raw(name, t, data_type, raw.into())
}

fn proto_with_raw(
    name: &str,
    t: &Tensor,
    data_type: DataType,
    raw: prost::bytes::Bytes,
) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: t.shape.iter().map(|&d| d as i64).collect(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert!(f16_to_f32(0x7e00).is_nan());
        assert_eq!(bf16_to_f32(0x3f80), 1.0);
    }

    #[test]
    fn external_paths() {
        let dir = std::env::temp_dir();
        assert!(safe_external_path(&dir, "/etc/passwd")
            .unwrap_err()
            .contains("absolute"));
        assert!(safe_external_path(&dir, "a/../../x.bin")
            .unwrap_err()
            .contains("leaves"));
        assert!(safe_external_path(&dir, "").is_err());
    }
}
