//! Host tensors: constants inside the IR (f32 weights, i64 shapes and ids, bool masks) and the f64
//! arrays the reference executor computes with. Device tensors are always f32: integer and bool
//! values travel as f32 there (ids exactly below 2^24, bools as 0.0/1.0).

use std::sync::Arc;

/// Element type of a value in the graph: what the value means, which decides folding and
/// reference semantics (a Cast to int truncates, comparisons give 0/1). On the device every value
/// is stored as f32 whatever its type. ONNX's other types map onto these three: float64/16 and
/// bfloat16 are computed as float32, int32 (and the other integer types) as int64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    I64,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::I64 => "int64",
            DType::Bool => "bool",
        }
    }

    pub fn is_float(self) -> bool {
        self == DType::F32
    }

    /// Bytes per element as ONNX stores it (float, int64, one byte per bool).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::I64 => 8,
            DType::Bool => 1,
        }
    }
}

/// f32 values, owned or borrowed straight from a memory-mapped file (weights are mapped, not
/// copied: the OS pages them in as the GPU upload reads them).
#[derive(Clone)]
pub enum F32Buf {
    Owned(Arc<[f32]>),
    /// `len` values at byte `offset` of `map` (4-byte aligned, little-endian host): external
    /// data.
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
    /// Little-endian f32 bytes at any alignment: an initializer's `raw_data` inside a mapped
    /// model file. The device upload copies the bytes as they are; a reader of the values gets
    /// them in place when they are aligned, else from one conversion, made on the first read
    /// and shared by the clones. Most weights are never read on the host, so most are never
    /// converted (protobuf aligns nothing: 83 MB of MiniLM's 90 MB are not 4-byte aligned).
    Raw(Arc<RawF32>),
    /// Values computed on the first read and shared by the clones: a quantized weight, which
    /// the device reads as its codes (`ir::blocks`), so that a host that never reads the values
    /// never holds them.
    Lazy(Arc<LazyF32>),
}

/// The values of an [`F32Buf::Lazy`]: how to compute them, and them once computed.
pub struct LazyF32 {
    len: usize,
    make: Box<dyn Fn() -> Vec<f32> + Send + Sync>,
    values: std::sync::OnceLock<Box<[f32]>>,
}

/// The bytes of an [`F32Buf::Raw`] and their conversion, made at most once.
pub struct RawF32 {
    pub bytes: prost::bytes::Bytes,
    values: std::sync::OnceLock<Box<[f32]>>,
}

impl F32Buf {
    /// Borrows `len` f32 values at `offset` of a mapped file when the layout allows it
    /// (aligned offset, little-endian host); None otherwise, and the caller copies.
    pub fn mapped(map: Arc<memmap2::Mmap>, offset: usize, len: usize) -> Option<F32Buf> {
        let fits = offset
            .checked_add(len * 4)
            .is_some_and(|end| end <= map.len());
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(4);
        (cfg!(target_endian = "little") && fits && aligned).then_some(F32Buf::Mapped {
            map,
            offset,
            len,
        })
    }

    /// Borrows little-endian f32 bytes (a whole number of values) on a little-endian host; None
    /// otherwise, and the caller converts.
    pub fn raw(bytes: prost::bytes::Bytes) -> Option<F32Buf> {
        (cfg!(target_endian = "little") && bytes.len().is_multiple_of(4)).then(|| {
            F32Buf::Raw(Arc::new(RawF32 {
                bytes,
                values: std::sync::OnceLock::new(),
            }))
        })
    }

    /// `len` values that `make` computes when they are first read.
    pub fn lazy(len: usize, make: impl Fn() -> Vec<f32> + Send + Sync + 'static) -> F32Buf {
        F32Buf::Lazy(Arc::new(LazyF32 {
            len,
            make: Box::new(make),
            values: std::sync::OnceLock::new(),
        }))
    }

    /// How many values, without computing lazy ones.
    pub fn len(&self) -> usize {
        match self {
            F32Buf::Owned(v) => v.len(),
            F32Buf::Mapped { len, .. } => *len,
            F32Buf::Raw(raw) => raw.bytes.len() / 4,
            F32Buf::Lazy(lazy) => lazy.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the values are computed on their first read and not read yet.
    pub fn is_pending(&self) -> bool {
        matches!(self, F32Buf::Lazy(lazy) if lazy.values.get().is_none())
    }

    pub fn is_mapped(&self) -> bool {
        matches!(self, F32Buf::Mapped { .. } | F32Buf::Raw(_))
    }

    /// The values' little-endian bytes, as a device upload copies them: borrowed, converting
    /// nothing, except owned values on a big-endian host.
    pub fn le_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        use std::borrow::Cow;
        match self {
            // Only little-endian hosts build these two.
            F32Buf::Raw(raw) => Cow::Borrowed(&raw.bytes),
            F32Buf::Mapped { map, offset, len } => Cow::Borrowed(&map[*offset..*offset + *len * 4]),
            F32Buf::Owned(_) | F32Buf::Lazy(_) if cfg!(target_endian = "little") => {
                Cow::Borrowed(bytemuck::cast_slice(self))
            }
            F32Buf::Owned(_) | F32Buf::Lazy(_) => {
                Cow::Owned(self.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        }
    }
}

impl std::ops::Deref for F32Buf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            F32Buf::Owned(v) => v,
            F32Buf::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + *len * 4])
            }
            F32Buf::Raw(raw) => match bytemuck::try_cast_slice(&raw.bytes) {
                Ok(aligned) => aligned,
                Err(_) => raw.values.get_or_init(|| {
                    raw.bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("chunks of 4")))
                        .collect()
                }),
            },
            F32Buf::Lazy(lazy) => lazy.values.get_or_init(|| {
                let values = (lazy.make)();
                assert_eq!(
                    values.len(),
                    lazy.len,
                    "a lazy buffer computed the wrong count"
                );
                values.into()
            }),
        }
    }
}

impl PartialEq for F32Buf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for F32Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            F32Buf::Lazy(_) => "lazy",
            _ if self.is_mapped() => "mapped",
            _ => "owned",
        };
        write!(f, "F32Buf({kind}, {} values)", self.len())
    }
}

impl From<Vec<f32>> for F32Buf {
    fn from(v: Vec<f32>) -> Self {
        F32Buf::Owned(v.into())
    }
}

impl FromIterator<f32> for F32Buf {
    fn from_iter<I: IntoIterator<Item = f32>>(iter: I) -> Self {
        F32Buf::Owned(iter.into_iter().collect())
    }
}

/// Immutable, cheaply cloned tensor data.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(F32Buf),
    I64(Arc<[i64]>),
    Bool(Arc<[bool]>),
}

/// A constant tensor (initializer, Constant node, adapter weight).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    /// The `len` entries from `start` along `axis`. Leading-axis slices of a memory-mapped f32
    /// tensor stay mapped; anything else is copied.
    pub fn slice_axis(&self, axis: usize, start: usize, len: usize) -> Tensor {
        let outer: usize = self.shape[..axis].iter().product();
        let inner: usize = self.shape[axis + 1..].iter().product();
        let dim = self.shape[axis];
        let mut shape = self.shape.clone();
        shape[axis] = len;
        if let (Data::F32(F32Buf::Mapped { map, offset, .. }), 1) = (&self.data, outer) {
            let view = F32Buf::mapped(map.clone(), offset + 4 * start * inner, len * inner);
            if let Some(view) = view {
                return Tensor {
                    shape,
                    data: Data::F32(view),
                };
            }
        }
        fn pick<T: Copy>(
            v: &[T],
            outer: usize,
            dim: usize,
            inner: usize,
            s: usize,
            l: usize,
        ) -> Vec<T> {
            (0..outer)
                .flat_map(|o| {
                    v[(o * dim + s) * inner..(o * dim + s + l) * inner]
                        .iter()
                        .copied()
                })
                .collect()
        }
        let data = match &self.data {
            Data::F32(v) => Data::F32(pick(v, outer, dim, inner, start, len).into()),
            Data::I64(v) => Data::I64(pick(v, outer, dim, inner, start, len).into()),
            Data::Bool(v) => Data::Bool(pick(v, outer, dim, inner, start, len).into()),
        };
        Tensor { shape, data }
    }

    /// f32 tensors joined along `axis` (the inverse of [`Tensor::slice_axis`]).
    pub fn concat_axis(parts: &[Tensor], axis: usize) -> Tensor {
        let mut shape = parts[0].shape.clone();
        shape[axis] = parts.iter().map(|t| t.shape[axis]).sum();
        let outer: usize = shape[..axis].iter().product();
        let values: Vec<Vec<f32>> = parts.iter().map(Tensor::to_f32).collect();
        let mut data = Vec::with_capacity(numel(&shape));
        for o in 0..outer {
            for (t, v) in parts.iter().zip(&values) {
                let block = numel(&t.shape[axis..]);
                data.extend_from_slice(&v[o * block..(o + 1) * block]);
            }
        }
        Tensor::f32(shape, data)
    }

    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(numel(&shape), data.len());
        Tensor {
            shape,
            data: Data::F32(data.into()),
        }
    }

    /// An f32 tensor whose values `fill` writes into zeros in place: for a large result (a
    /// dequantized weight), one allocation and no copy.
    pub fn f32_filled(shape: Vec<usize>, fill: impl FnOnce(&mut [f32])) -> Self {
        // Collected from an iterator of known length: one allocation, written once.
        let mut values: Arc<[f32]> = std::iter::repeat_n(0.0, numel(&shape)).collect();
        fill(Arc::get_mut(&mut values).expect("a new Arc has one owner"));
        Tensor {
            shape,
            data: Data::F32(F32Buf::Owned(values)),
        }
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        debug_assert_eq!(numel(&shape), data.len());
        Tensor {
            shape,
            data: Data::I64(data.into()),
        }
    }

    pub fn bool(shape: Vec<usize>, data: Vec<bool>) -> Self {
        debug_assert_eq!(numel(&shape), data.len());
        Tensor {
            shape,
            data: Data::Bool(data.into()),
        }
    }

    pub fn scalar(v: f32) -> Self {
        Tensor::f32(vec![], vec![v])
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::I64(_) => DType::I64,
            Data::Bool(_) => DType::Bool,
        }
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The values widened to f64 (exact for f32, and for i64 below 2^53).
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as u8 as f64).collect(),
        }
    }

    /// The values as the device holds them: f32 (ids exact below 2^24, bools as 0/1).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.to_vec(),
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// `f` of the values as f32, without keeping lazy ones computed (`F32Buf::Lazy`): a pass
    /// that reads a quantized weight once (DoRA's column norms) leaves the host without a copy.
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> R) -> R {
        match &self.data {
            Data::F32(F32Buf::Lazy(lazy)) if lazy.values.get().is_none() => f(&(lazy.make)()),
            Data::F32(v) => f(v),
            _ => f(&self.to_f32()),
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            _ => None,
        }
    }

    pub fn to_array(&self) -> Array {
        Array::new(self.shape.clone(), self.to_f64())
    }
}

/// A dense row-major f64 array: the reference executor's value type.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Array {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(
            numel(&shape),
            data.len(),
            "array data does not fit its shape"
        );
        Array { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = numel(&shape);
        Array::new(shape, vec![0.0; n])
    }

    pub fn to_tensor_f32(&self) -> Tensor {
        Tensor::f32(
            self.shape.clone(),
            self.data.iter().map(|&x| x as f32).collect(),
        )
    }

    /// The values as a tensor of `dtype`: rounded once to f32, or (for integer and bool values,
    /// which the reference computes exactly) converted: integers truncate toward zero (NaN gives
    /// 0, out-of-range values saturate), bools are `x != 0`.
    pub fn to_tensor(&self, dtype: DType) -> Tensor {
        let shape = self.shape.clone();
        match dtype {
            DType::F32 => self.to_tensor_f32(),
            DType::I64 => Tensor::i64(shape, self.data.iter().map(|&x| x as i64).collect()),
            DType::Bool => Tensor::bool(shape, self.data.iter().map(|&x| x != 0.0).collect()),
        }
    }

    pub fn from_f32(shape: Vec<usize>, data: &[f32]) -> Self {
        Array::new(shape, data.iter().map(|&x| x as f64).collect())
    }
}

/// The element count of a shape, saturating at `usize::MAX` instead of wrapping, so an
/// overflowing shape is never mistaken for a small one (and fails [`check_size`]).
pub fn numel(shape: &[usize]) -> usize {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .unwrap_or(usize::MAX)
}

/// The most bytes one tensor may take: `DORAC_MEMORY_BUDGET` (bytes, or with a K, M, G or T
/// suffix), else half the machine's memory, else 8 GiB. Every tensor a model can ask dorac to
/// allocate (constants, folded values, node outputs, inputs pinned by `--shape`, adapters of a
/// given `--rank`) is checked against it before anything is allocated.
pub fn memory_budget() -> u64 {
    static BUDGET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        if let Some(b) = std::env::var("DORAC_MEMORY_BUDGET")
            .ok()
            .and_then(|v| parse_bytes(&v))
        {
            return b;
        }
        let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
        total.map_or(8 << 30, |t| t / 2)
    })
}

/// `123`, `64K`, `512M`, `8G`, `1T` (binary units) as bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 10),
        'm' | 'M' => (&s[..s.len() - 1], 20),
        'g' | 'G' => (&s[..s.len() - 1], 30),
        't' | 'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Checks that a tensor of `shape` with `elem_bytes`-byte elements fits the
/// [`memory_budget`]; `what` names it for the error (a node, an initializer, an input).
pub fn check_size(
    shape: &[usize],
    elem_bytes: usize,
    what: impl FnOnce() -> String,
) -> crate::error::Result<()> {
    let budget = memory_budget();
    let bytes = shape
        .iter()
        .try_fold(elem_bytes as u128, |acc, &d| acc.checked_mul(d as u128));
    match bytes {
        Some(b) if b <= budget as u128 => Ok(()),
        _ => Err(crate::error::Error::TooLarge {
            what: what(),
            shape: shape_str(shape),
            bytes,
            budget,
        }),
    }
}

/// Row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// `1x16x8` style, for messages and the CLI.
pub fn shape_str(shape: &[usize]) -> String {
    if shape.is_empty() {
        return "scalar".into();
    }
    shape
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("x")
}

/// Max-abs error over max-abs value of the reference: the project's one comparison metric.
/// NaN anywhere gives infinity, so NaN never passes a tolerance check.
pub fn relative_error(actual: &[f64], expected: &[f64]) -> f64 {
    if actual.len() != expected.len() {
        return f64::INFINITY;
    }
    let mut max_err = 0.0f64;
    let mut max_ref = 0.0f64;
    for (&a, &e) in actual.iter().zip(expected) {
        if !a.is_finite() || !e.is_finite() {
            return f64::INFINITY;
        }
        max_err = max_err.max((a - e).abs());
        max_ref = max_ref.max(e.abs());
    }
    if max_ref == 0.0 {
        max_err
    } else {
        max_err / max_ref
    }
}

/// A small deterministic generator (SplitMix64) for initialisation and test inputs, so results
/// depend on the seed alone and not on a crate's version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw little-endian bytes read back as their values at every alignment, hand the upload
    /// the very bytes they were given, and convert (when unaligned) once for all clones.
    #[test]
    #[cfg(target_endian = "little")]
    fn raw_bytes_read_as_values_at_any_alignment() {
        let values = [1.5f32, -2.25, 3.0e-8, f32::MAX, -0.0];
        let le: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for shift in 0..4 {
            let mut padded = vec![0xAAu8; shift];
            padded.extend(&le);
            let bytes = prost::bytes::Bytes::from(padded).slice(shift..);
            let buf = F32Buf::raw(bytes.clone()).expect("a whole number of f32s");
            assert!(buf.is_mapped());
            assert_eq!(&*buf.le_bytes(), &le[..]);
            let twin = buf.clone();
            assert_eq!(&*buf, &values[..], "shift {shift}");
            assert_eq!(&*twin, &values[..], "shift {shift}");
            if let (F32Buf::Raw(a), F32Buf::Raw(b)) = (&buf, &twin) {
                assert!(Arc::ptr_eq(a, b), "clones share the conversion");
            }
        }
        let odd = prost::bytes::Bytes::from(vec![0u8; 7]);
        assert!(F32Buf::raw(odd).is_none(), "7 bytes are no f32 values");
    }
}
