//! PyTorch zip checkpoints (`torch.save`'s format since 1.6): a zip archive holding
//! `<prefix>/data.pkl` (the pickled object, with tensors referring to storages by key),
//! `<prefix>/data/<key>` (each storage's raw little-endian bytes), `<prefix>/byteorder` and
//! `<prefix>/version`. The prefix folder name varies (torch uses the file's stem or `archive`).
//!
//! The archive is memory-mapped. `torch.save` stores entries uncompressed, so a storage is a slice
//! of the map; an entry another tool compressed is decompressed when a tensor in it is read.
//! Every tensor's view (offset, shape, strides) is checked against its storage when the file is
//! opened, so reads cannot go out of bounds.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::Path;

use zip::{CompressionMethod, ZipArchive};

use super::pickle::{self, Unpickled, Value};
use super::{map_file, Checkpoint, Reader};
use crate::error::{ExportError, Result};
use crate::tensor::{decode_to_f32, DType, TensorMeta};

const FORMAT: &str = "pytorch zip";

/// Largest `data.pkl` we read (it holds only structure; tensor data lives in storages).
const MAX_PICKLE_BYTES: u64 = 1 << 30;

/// Tensor data of a memory-mapped PyTorch zip checkpoint.
#[derive(Debug)]
pub(super) struct TorchReader {
    mmap: memmap2::Mmap,
    storages: Vec<Storage>,
    views: HashMap<String, View>,
}

/// Where a storage's bytes are in the archive.
#[derive(Debug)]
struct Storage {
    /// The archive entry, for error messages.
    entry: String,
    /// Length of the uncompressed bytes.
    len: usize,
    location: Location,
}

#[derive(Debug)]
enum Location {
    /// Stored uncompressed: the bytes are `mmap[start..start + len]`.
    Mapped { start: usize },
    /// Compressed: entry `index` of the archive, decompressed on read.
    Compressed { index: usize },
}

/// A tensor as a strided view (in elements) into a storage. Checked at open: every element it
/// addresses lies within the storage.
#[derive(Debug)]
struct View {
    storage: usize,
    dtype: DType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// Open `file` (already identified as a zip archive by its first bytes) at `path`.
pub(super) fn open(path: &Path, file: &File) -> Result<Checkpoint> {
    let mmap = map_file(path, file)?;
    let malformed = |reason: String| ExportError::malformed(path, FORMAT, reason);
    let mut archive = ZipArchive::new(Cursor::new(&mmap[..]))
        .map_err(|e| malformed(format!("cannot read the zip directory: {e}")))?;

    let names: Vec<String> = (0..archive.len())
        .map(|i| match archive.name_for_index(i) {
            Some(Ok(name)) => name.into_owned(),
            _ => String::new(),
        })
        .collect();
    let prefix = find_prefix(path, &names)?;
    let indices: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let index_of = |name: &str| indices.get(name).copied();

    if let Some(i) = index_of(&format!("{prefix}byteorder")) {
        let order = read_entry(path, &mut archive, i, 64)?;
        let order = String::from_utf8_lossy(&order);
        if order.trim() != "little" {
            return Err(malformed(format!(
                "byte order is {:?}; only little-endian checkpoints are supported",
                order.trim()
            )));
        }
    }

    let pkl_index = index_of(&format!("{prefix}data.pkl"))
        .ok_or_else(|| malformed(format!("no {prefix}data.pkl")))?;
    let pkl = read_entry(path, &mut archive, pkl_index, MAX_PICKLE_BYTES)?;
    let unpickled = pickle::unpickle(path, &pkl)?;
    let (tensors, nested_state_dict) = state_dict(path, &unpickled)?;

    let mut storages: Vec<Storage> = Vec::new();
    let mut storage_by_key: HashMap<&str, usize> = HashMap::new();
    let mut metas = BTreeMap::new();
    let mut views = HashMap::new();
    for (key, tensor_id) in tensors {
        let tensor = unpickled
            .tensors
            .get(tensor_id)
            .ok_or_else(|| malformed(format!("tensor `{key}`: dangling reference")))?;
        let storage_ref = unpickled
            .storages
            .get(tensor.storage)
            .ok_or_else(|| malformed(format!("tensor `{key}`: dangling storage reference")))?;
        let storage = match storage_by_key.get(storage_ref.key.as_str()) {
            Some(&i) => i,
            None => {
                let entry = format!("{prefix}data/{}", storage_ref.key);
                let index = index_of(&entry).ok_or_else(|| {
                    malformed(format!("tensor `{key}`: storage entry {entry} is missing"))
                })?;
                storages.push(locate(path, &mut archive, index, entry, mmap.len())?);
                storage_by_key.insert(&storage_ref.key, storages.len() - 1);
                storages.len() - 1
            }
        };
        let dtype = storage_ref.dtype;
        // The view must stay within both the storage size the pickle declares and the bytes
        // the archive actually holds.
        let available = (storages[storage].len / dtype.size()).min(storage_ref.numel);
        let needed = elements_needed(tensor.offset, &tensor.shape, &tensor.stride);
        if needed.is_none_or(|needed| needed > available) {
            return Err(malformed(format!(
                "tensor `{key}`: view (offset {}, shape {:?}, stride {:?}) reaches past the end \
                 of its storage {} ({available} {dtype} elements)",
                tensor.offset, tensor.shape, tensor.stride, storages[storage].entry
            )));
        }
        metas.insert(
            key.clone(),
            TensorMeta {
                dtype,
                shape: tensor.shape.clone(),
            },
        );
        views.insert(
            key,
            View {
                storage,
                dtype,
                offset: tensor.offset,
                shape: tensor.shape.clone(),
                stride: tensor.stride.clone(),
            },
        );
    }
    drop(archive);

    Ok(Checkpoint {
        path: path.to_path_buf(),
        metas,
        nested_state_dict,
        reader: Reader::Torch(TorchReader {
            mmap,
            storages,
            views,
        }),
    })
}

/// The folder (with its trailing `/`) holding `data.pkl`: the single entry named
/// `<folder>/data.pkl` (or `data.pkl` at the root).
fn find_prefix(path: &Path, names: &[String]) -> Result<String> {
    let candidates: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix("data.pkl"))
        .filter(|p| p.is_empty() || (p.ends_with('/') && p.matches('/').count() == 1))
        .collect();
    match candidates.as_slice() {
        [prefix] => Ok(prefix.to_string()),
        [] => Err(ExportError::UnknownFormat {
            path: path.to_path_buf(),
            reason: "a zip archive without a <folder>/data.pkl, so not a PyTorch checkpoint".into(),
        }),
        several => Err(ExportError::malformed(
            path,
            FORMAT,
            format!(
                "several data.pkl entries ({})",
                several.join("data.pkl, ") + "data.pkl"
            ),
        )),
    }
}

/// Read a whole (small) archive entry, refusing entries larger than `max` bytes.
fn read_entry(
    path: &Path,
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    index: usize,
    max: u64,
) -> Result<Vec<u8>> {
    let malformed = |reason: String| ExportError::malformed(path, FORMAT, reason);
    let entry = archive
        .by_index(index)
        .map_err(|e| malformed(format!("cannot read archive entry {index}: {e}")))?;
    let name = entry.name().map(|n| n.into_owned()).unwrap_or_default();
    if entry.size() > max {
        return Err(malformed(format!(
            "{name} is {} bytes, more than the {max} allowed",
            entry.size()
        )));
    }
    let mut bytes = Vec::new();
    // `take` bounds what a lying size field can make us allocate.
    entry
        .take(max)
        .read_to_end(&mut bytes)
        .map_err(|e| malformed(format!("cannot read {name}: {e}")))?;
    Ok(bytes)
}

/// Where the bytes of storage entry `index` (named `entry`) are.
fn locate(
    path: &Path,
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    index: usize,
    entry: String,
    file_len: usize,
) -> Result<Storage> {
    let malformed = |reason: String| ExportError::malformed(path, FORMAT, reason);
    let file = archive
        .by_index_raw(index)
        .map_err(|e| malformed(format!("cannot read archive entry {entry}: {e}")))?;
    if file.encrypted() {
        return Err(malformed(format!("{entry} is encrypted")));
    }
    let len = usize::try_from(file.size())
        .map_err(|_| malformed(format!("{entry} is too large for this machine")))?;
    let location = match file.compression() {
        CompressionMethod::Stored => {
            let start = file
                .data_start()
                .and_then(|s| usize::try_from(s).ok())
                .filter(|&s| s.checked_add(len).is_some_and(|end| end <= file_len))
                .ok_or_else(|| {
                    malformed(format!("{entry}: its data lies past the end of the file"))
                })?;
            if file.compressed_size() != file.size() {
                return Err(malformed(format!("{entry}: stored entry with two sizes")));
            }
            Location::Mapped { start }
        }
        _ => Location::Compressed { index },
    };
    Ok(Storage {
        entry,
        len,
        location,
    })
}

/// The tensors of the checkpoint's top-level dict, or of its `state_dict` entry when that is a
/// dict, as (key, index into `unpickled.tensors`); and whether they came from `state_dict`.
/// Values that are not tensors are skipped; a repeated key keeps its last value.
fn state_dict(path: &Path, unpickled: &Unpickled) -> Result<(BTreeMap<String, usize>, bool)> {
    let Some(top) = unpickled.as_dict(&unpickled.root) else {
        return Err(ExportError::malformed(
            path,
            FORMAT,
            format!(
                "the top-level object is {}, expected a dict of tensors",
                unpickled.describe(&unpickled.root)
            ),
        ));
    };
    let nested = top
        .iter()
        .rev()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == "state_dict"))
        .and_then(|(_, v)| unpickled.as_dict(v));
    let (items, is_nested) = match nested {
        Some(items) => (items, true),
        None => (top, false),
    };

    let mut tensors = BTreeMap::new();
    for (key, value) in items {
        let Value::Tensor(id) = value else { continue };
        let Value::Str(key) = key else {
            return Err(ExportError::malformed(
                path,
                FORMAT,
                format!(
                    "a tensor is stored under {}, expected a string key",
                    unpickled.describe(key)
                ),
            ));
        };
        tensors.insert(key.to_string(), *id);
    }
    Ok((tensors, is_nested))
}

/// Elements a storage must hold for a view (`offset`, `shape`, `stride`) to stay in bounds:
/// one past the largest element index it addresses (0 for an empty view). `None` on overflow.
fn elements_needed(offset: usize, shape: &[usize], stride: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let mut last = offset;
    for (&dim, &step) in shape.iter().zip(stride) {
        last = last.checked_add((dim - 1).checked_mul(step)?)?;
    }
    last.checked_add(1)
}

impl TorchReader {
    /// Decode tensor `key` into `out` as row-major f32, gathering strided views.
    pub(super) fn read_into(&self, path: &Path, key: &str, out: &mut Vec<f32>) -> Result<()> {
        let result = self.decode_into(path, key, out);
        // Drop the pages just read from this process's mapping (the page cache keeps them), so
        // reading a multi-GB checkpoint tensor by tensor does not grow the resident set to the
        // file's size. Purely a hint: errors are ignored.
        if let Some(storage) = self
            .views
            .get(key)
            .and_then(|v| self.storages.get(v.storage))
        {
            if let Location::Mapped { start } = storage.location {
                // SAFETY: the mapping is private and read-only; after MADV_DONTNEED the kernel
                // re-reads any page touched again from the file, so no data we rely on changes.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        storage.len,
                    )
                };
            }
        }
        result
    }

    fn decode_into(&self, path: &Path, key: &str, out: &mut Vec<f32>) -> Result<()> {
        let malformed = |reason: String| ExportError::malformed(path, FORMAT, reason);
        let view = self
            .views
            .get(key)
            .ok_or_else(|| malformed(format!("tensor `{key}` has no storage")))?;
        let storage = self
            .storages
            .get(view.storage)
            .ok_or_else(|| malformed(format!("tensor `{key}`: dangling storage")))?;

        let decompressed;
        let bytes: &[u8] = match storage.location {
            Location::Mapped { start } => self
                .mmap
                .get(start..start + storage.len)
                .ok_or_else(|| malformed(format!("tensor `{key}`: storage out of the file")))?,
            Location::Compressed { index } => {
                decompressed = self.decompress(path, key, index, storage)?;
                &decompressed
            }
        };

        let size = view.dtype.size();
        let numel: usize = view.shape.iter().product();
        let out_of_bounds = || malformed(format!("tensor `{key}`: view out of its storage"));
        if is_row_major(&view.shape, &view.stride) {
            let start = view.offset * size;
            let chunk = bytes
                .get(start..start + numel * size)
                .ok_or_else(out_of_bounds)?;
            decode_to_f32(view.dtype, chunk, out);
            return Ok(());
        }

        // Strided view: gather the elements in row-major order, then decode. The arithmetic
        // cannot overflow: `open` checked that the largest index fits in the storage.
        let mut gathered = Vec::with_capacity(numel * size);
        let mut index = vec![0usize; view.shape.len()];
        for _ in 0..numel {
            let element = view.offset
                + index
                    .iter()
                    .zip(&view.stride)
                    .map(|(i, s)| i * s)
                    .sum::<usize>();
            let at = element * size;
            gathered.extend_from_slice(bytes.get(at..at + size).ok_or_else(out_of_bounds)?);
            for (i, &dim) in index.iter_mut().zip(&view.shape).rev() {
                *i += 1;
                if *i < dim {
                    break;
                }
                *i = 0;
            }
        }
        decode_to_f32(view.dtype, &gathered, out);
        Ok(())
    }

    fn decompress(
        &self,
        path: &Path,
        key: &str,
        index: usize,
        storage: &Storage,
    ) -> Result<Vec<u8>> {
        let mut archive = ZipArchive::new(Cursor::new(&self.mmap[..]))
            .map_err(|e| ExportError::malformed(path, FORMAT, format!("tensor `{key}`: {e}")))?;
        let bytes = read_entry(path, &mut archive, index, storage.len as u64)?;
        if bytes.len() != storage.len {
            return Err(ExportError::malformed(
                path,
                FORMAT,
                format!(
                    "tensor `{key}`: {} decompresses to {} bytes, its header says {}",
                    storage.entry,
                    bytes.len(),
                    storage.len
                ),
            ));
        }
        Ok(bytes)
    }
}

/// Whether a view with `shape` and `stride` is contiguous in row-major order (dimensions of size
/// one may have any stride).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&dim, &step) in shape.iter().zip(stride).rev() {
        if dim != 1 && step != expected {
            return false;
        }
        expected = expected.saturating_mul(dim);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// `{'w': <float32 tensor of shape (2,) on storage '0' declared with 2 elements>}`.
    const PICKLE: &[u8] = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n\
        ((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000\
        X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85K\x01\x85\x89)tRu.";

    /// Write a zip archive of `entries` to a temporary file and open it.
    fn open_zip(entries: &[(&str, &[u8])]) -> (tempfile::TempDir, Result<Checkpoint>) {
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options =
            zip::write::SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        for (name, body) in entries {
            writer.start_file(*name, options).unwrap();
            writer.write_all(body).unwrap();
        }
        let bytes = writer.finish().unwrap().into_inner();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crafted.pt");
        std::fs::write(&path, bytes).unwrap();
        let result = Checkpoint::open(&path);
        (dir, result)
    }

    fn malformed_reason(result: Result<Checkpoint>) -> String {
        match result {
            Err(ExportError::Malformed { path, reason, .. }) => {
                assert!(path.ends_with("crafted.pt"));
                reason
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    const FLOATS: &[u8] = b"\x00\x00\x80\x3f\x00\x00\x00\x40"; // 1.0, 2.0

    #[test]
    fn crafted_archive_reads() {
        let (_d, r) = open_zip(&[
            ("any_name/data.pkl", PICKLE),
            ("any_name/byteorder", b"little"),
            ("any_name/data/0", FLOATS),
        ]);
        let ckpt = r.unwrap();
        assert_eq!(ckpt.read_f32("w").unwrap(), vec![1.0, 2.0]);
    }

    #[test]
    fn crafted_archive_errors() {
        let (_d, r) = open_zip(&[("archive/data.pkl", PICKLE)]);
        let reason = malformed_reason(r);
        assert!(
            reason.contains("`w`") && reason.contains("missing"),
            "{reason}"
        );

        let (_d, r) = open_zip(&[
            ("archive/data.pkl", PICKLE),
            ("archive/data/0", &FLOATS[..4]),
        ]);
        let reason = malformed_reason(r);
        assert!(
            reason.contains("`w`") && reason.contains("past the end"),
            "{reason}"
        );

        let (_d, r) = open_zip(&[
            ("archive/data.pkl", PICKLE),
            ("archive/byteorder", b"big"),
            ("archive/data/0", FLOATS),
        ]);
        assert!(malformed_reason(r).contains("little-endian"));

        let (_d, r) = open_zip(&[
            ("archive/data.pkl", b"\x80\x02]."),
            ("archive/data/0", FLOATS),
        ]);
        assert!(malformed_reason(r).contains("top-level object is a list"));

        let (_d, r) = open_zip(&[("a/data.pkl", PICKLE), ("b/data.pkl", PICKLE)]);
        assert!(malformed_reason(r).contains("several data.pkl"));

        let (_d, r) = open_zip(&[("docs/readme.txt", b"hello")]);
        assert!(matches!(r, Err(ExportError::UnknownFormat { .. })), "{r:?}");
    }

    #[test]
    fn view_extent() {
        assert_eq!(elements_needed(0, &[3, 5], &[5, 1]), Some(15));
        assert_eq!(elements_needed(0, &[5, 3], &[1, 5]), Some(15));
        assert_eq!(elements_needed(4, &[2, 2], &[2, 1]), Some(8));
        assert_eq!(elements_needed(7, &[0, 3], &[3, 1]), Some(0));
        assert_eq!(elements_needed(2, &[], &[]), Some(3));
        assert_eq!(elements_needed(0, &[3, 2], &[0, 1]), Some(2));
        assert_eq!(elements_needed(0, &[usize::MAX, 2], &[2, 1]), None);
    }

    #[test]
    fn row_major_detection() {
        assert!(is_row_major(&[3, 5], &[5, 1]));
        assert!(is_row_major(&[], &[]));
        assert!(is_row_major(&[1, 4], &[99, 1]));
        assert!(!is_row_major(&[5, 3], &[1, 5]));
        assert!(!is_row_major(&[3, 2], &[5, 2]));
        assert!(!is_row_major(&[3, 2], &[0, 1]));
    }
}
