//! safetensors files: an 8-byte little-endian header length, a JSON header, then the data.
//! The header is parsed and validated when the file is opened (offsets contiguous, in bounds,
//! and matching each tensor's shape and dtype) through a temporary memory map; a tensor's bytes
//! are read with positioned reads (`pread`) only when it is requested, so reading a multi-GB
//! checkpoint tensor by tensor keeps neither the file's pages mapped nor more than one tensor in
//! memory.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::Path;

use ::safetensors::tensor::{Dtype, SafeTensorError, SafeTensors};

use super::{map_file, Checkpoint, Reader};
use crate::error::{ExportError, Result};
use crate::tensor::{decode_to_f32, DType, TensorMeta};

const FORMAT: &str = "safetensors";

/// Tensor data of a safetensors file.
#[derive(Debug)]
pub(super) struct SafetensorsReader {
    file: File,
    /// Absolute byte range of each tensor in the file.
    ranges: HashMap<String, Range<usize>>,
}

/// Open `file` (already identified as safetensors by its first bytes) at `path`.
pub(super) fn open(path: &Path, file: &File) -> Result<Checkpoint> {
    let mmap = map_file(path, file)?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&mmap).map_err(|e| header_error(path, &mmap, e))?;
    // read_metadata checked that 8 + header_len is within the file.
    let data_start = 8 + header_len;

    let mut metas = BTreeMap::new();
    let mut ranges = HashMap::new();
    for (key, info) in metadata.tensors() {
        let dtype = map_dtype(info.dtype).ok_or_else(|| ExportError::UnsupportedDtype {
            path: path.to_path_buf(),
            tensor: key.clone(),
            found: info.dtype.to_string(),
            expected: "F64, F32, F16, BF16, I64, I32, I16, I8, U8 or BOOL",
        })?;
        let (begin, end) = info.data_offsets;
        let range = data_start
            .checked_add(begin)
            .zip(data_start.checked_add(end))
            .filter(|&(b, e)| b <= e && e <= mmap.len())
            .map(|(b, e)| b..e)
            .ok_or_else(|| {
                ExportError::malformed(
                    path,
                    FORMAT,
                    format!("data of tensor `{key}` lies past the end of the file"),
                )
            })?;
        metas.insert(
            key.clone(),
            TensorMeta {
                dtype,
                shape: info.shape.clone(),
            },
        );
        ranges.insert(key, range);
    }

    Ok(Checkpoint {
        path: path.to_path_buf(),
        metas,
        nested_state_dict: false,
        reader: Reader::Safetensors(SafetensorsReader {
            file: file.try_clone().map_err(|e| ExportError::io(path, e))?,
            ranges,
        }),
    })
}

thread_local! {
    /// Raw bytes of the tensor being read, reused across reads.
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl SafetensorsReader {
    /// Decode tensor `key` (described by `meta`) into `out`.
    pub(super) fn read_into(
        &self,
        path: &Path,
        key: &str,
        meta: &TensorMeta,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        BUF.with_borrow_mut(|buf| {
            self.read_raw_into(path, key, meta, buf)?;
            decode_to_f32(meta.dtype, buf, out);
            Ok(())
        })
    }

    /// The stored little-endian bytes of `key` (always contiguous in safetensors).
    pub(super) fn read_raw_into(
        &self,
        path: &Path,
        key: &str,
        meta: &TensorMeta,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let expected = meta.numel().checked_mul(meta.dtype.size());
        match self.ranges.get(key) {
            Some(range) if Some(range.len()) == expected => {
                out.clear();
                out.resize(range.len(), 0);
                self.file
                    .read_exact_at(out, range.start as u64)
                    .map_err(|e| ExportError::io(path, e))
            }
            _ => Err(ExportError::malformed(
                path,
                FORMAT,
                format!(
                    "tensor `{key}`: data range does not match its shape {:?} and dtype {}",
                    meta.shape, meta.dtype
                ),
            )),
        }
    }
}

fn map_dtype(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::I16 => DType::I16,
        Dtype::I8 => DType::I8,
        Dtype::U8 => DType::U8,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// The first tensor of the header in `bytes` whose data offsets do not span its shape × its
/// element size (what safetensors reports without naming the tensor), described.
fn mismatched_tensor(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .find_map(|(k, t)| {
            let dtype = t.get("dtype")?.as_str()?;
            let size: u128 = match dtype {
                "F64" | "I64" | "U64" => 8,
                "F32" | "I32" | "U32" => 4,
                "F16" | "BF16" | "I16" | "U16" => 2,
                _ => 1,
            };
            let shape: Vec<u64> = t
                .get("shape")?
                .as_array()?
                .iter()
                .map(|d| d.as_u64())
                .collect::<Option<_>>()?;
            let offs = t.get("data_offsets")?.as_array()?;
            let (b, e) = (offs.first()?.as_u64()?, offs.get(1)?.as_u64()?);
            let want = shape
                .iter()
                .try_fold(size, |n, &d| n.checked_mul(u128::from(d)));
            let have = u128::from(e.checked_sub(b)?);
            (want != Some(have)).then(|| {
                format!(
                    "tensor `{k}`: {dtype} {shape:?} needs {} bytes, but its data offsets [{b}, {e}] hold {have}",
                    want.map_or("more than 2^128".into(), |w| w.to_string())
                )
            })
        })
}

fn header_error(path: &Path, bytes: &[u8], e: SafeTensorError) -> ExportError {
    let file_len = bytes.len();
    let reason = match e {
        SafeTensorError::TensorInvalidInfo => mismatched_tensor(bytes)
            .unwrap_or_else(|| "a tensor's shape, data type and data offsets do not agree".into()),
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the header's data offsets do not end at the end of the file ({file_len} bytes): \
             the file is truncated or has trailing bytes"
        ),
        SafeTensorError::InvalidHeaderLength => format!(
            "the header length runs past the end of the file ({file_len} bytes): truncated?"
        ),
        SafeTensorError::InvalidOffset(tensor) => {
            format!("tensor `{tensor}`: its data offsets are not contiguous or run past the data")
        }
        other => other.to_string(),
    };
    ExportError::malformed(path, FORMAT, reason)
}
