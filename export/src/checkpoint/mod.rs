//! Checkpoint readers: safetensors (memory-mapped) and PyTorch zip checkpoints through a
//! restricted unpickler. Both expose the same [`Checkpoint`] view: tensor metadata up front, tensor
//! data read one tensor at a time, so an export never holds all weights in memory.
//!
//! (Implementation: see `safetensors.rs`, `torch.rs`, `pickle.rs`.)

mod pickle;
mod safetensors;
mod torch;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{ExportError, Result};
use crate::tensor::{DType, TensorMeta};

/// The on-disk format of a checkpoint, as recognised from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `torch.save`'s zip format (PyTorch ≥ 1.6), whatever the file's extension.
    TorchZip,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Safetensors => "safetensors",
            Format::TorchZip => "pytorch zip",
        })
    }
}

/// An open checkpoint file: the metadata of every tensor, read when opened, and the file
/// memory-mapped so that each tensor's data is read only when asked for.
///
/// The file must not be modified while the checkpoint is open (as with any memory-mapped reader,
/// truncating it underneath would fault).
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    metas: BTreeMap<String, TensorMeta>,
    nested_state_dict: bool,
    reader: Reader,
}

#[derive(Debug)]
enum Reader {
    Safetensors(safetensors::SafetensorsReader),
    Torch(torch::TorchReader),
}

impl Checkpoint {
    /// Open a checkpoint, recognising its format by content (magic bytes), not by extension.
    /// Reads and validates metadata only; tensor data is read by [`Checkpoint::read_f32`].
    ///
    /// Errors: [`ExportError::UnknownFormat`] for files of no supported format (including the
    /// legacy non-zip PyTorch format, with advice on converting it), [`ExportError::Malformed`]
    /// for damaged files, [`ExportError::UnsafePickle`] for pickles that reference anything but
    /// tensors and containers, [`ExportError::UnsupportedDtype`] for element types we cannot
    /// represent.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let mut file = File::open(path).map_err(|e| ExportError::io(path, e))?;
        let mut head = [0u8; 16];
        let head_len = read_head(&mut file, &mut head).map_err(|e| ExportError::io(path, e))?;
        let head = &head[..head_len];
        match sniff(head) {
            Sniffed::Safetensors => safetensors::open(path, &file),
            Sniffed::Zip => torch::open(path, &file),
            Sniffed::Unsupported(reason) => Err(ExportError::UnknownFormat {
                path: path.to_path_buf(),
                reason,
            }),
        }
    }

    /// The file this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> Format {
        match self.reader {
            Reader::Safetensors(_) => Format::Safetensors,
            Reader::Torch(_) => Format::TorchZip,
        }
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Tensor keys, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.metas.keys().map(String::as_str)
    }

    /// Dtype and shape of tensor `key`, if present.
    pub fn meta(&self, key: &str) -> Option<&TensorMeta> {
        self.metas.get(key)
    }

    /// Tensor `key` as contiguous row-major data converted to f32 (non-contiguous views are
    /// gathered; integer and bool elements are converted by value). Errors name the file and key.
    pub fn read_f32(&self, key: &str) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.read_f32_into(key, &mut out)?;
        Ok(out)
    }

    fn meta_or_missing(&self, key: &str) -> Result<&TensorMeta> {
        self.metas
            .get(key)
            .ok_or_else(|| ExportError::MissingTensor {
                path: self.path.clone(),
                tensor: key.to_string(),
                expected_for: "the requested read".into(),
            })
    }

    /// Like [`Checkpoint::read_f32`], reusing `out` (which is cleared first) to avoid an
    /// allocation per tensor.
    pub fn read_f32_into(&self, key: &str, out: &mut Vec<f32>) -> Result<()> {
        out.clear();
        let meta = self.meta_or_missing(key)?;
        match &self.reader {
            Reader::Safetensors(r) => r.read_into(&self.path, key, meta, out),
            Reader::Torch(r) => r.read_into(&self.path, key, out),
        }
    }

    /// The tensor's stored bytes (little-endian, row-major) when the file holds them contiguously
    /// (safetensors): returns their dtype. `Ok(None)` for formats that need [`Self::read_f32_into`]
    /// (PyTorch views may be strided). Lets a same-dtype copy skip decoding.
    pub fn read_raw_into(&self, key: &str, out: &mut Vec<u8>) -> Result<Option<DType>> {
        let meta = self.meta_or_missing(key)?;
        match &self.reader {
            Reader::Safetensors(r) => r
                .read_raw_into(&self.path, key, meta, out)
                .map(|()| Some(meta.dtype)),
            Reader::Torch(_) => Ok(None),
        }
    }

    /// Whether the tensors were found nested under a top-level `state_dict` entry (PyTorch
    /// Lightning-style checkpoints). Always false for safetensors.
    pub fn nested_state_dict(&self) -> bool {
        self.nested_state_dict
    }
}

/// Memory-map `file` read-only.
fn map_file(path: &Path, file: &File) -> Result<memmap2::Mmap> {
    // SAFETY: the map is read-only and private to this process. Like every memory-mapped reader
    // we rely on the file not being truncated or rewritten while it is open (documented on
    // `Checkpoint`); all accesses are bounds-checked against the map's length.
    unsafe { memmap2::Mmap::map(file) }.map_err(|e| ExportError::io(path, e))
}

/// Fill `buf` from the start of `file` as far as the file allows; returns the bytes read.
fn read_head(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

enum Sniffed {
    Safetensors,
    Zip,
    /// Recognised as something we do not read, or not recognised; the reason says which.
    Unsupported(String),
}

/// `torch.save`'s legacy format starts with a pickled magic number: PROTO 2, LONG1 of 10 bytes.
const LEGACY_TORCH_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Identify a file from its first (up to 16) bytes.
fn sniff(head: &[u8]) -> Sniffed {
    const LEGACY_ADVICE: &str = "motionrt reads only the zip format torch.save writes since \
        PyTorch 1.6: re-save it with a current torch \
        (`torch.save(torch.load(old, weights_only=True), new)`) or convert it to .safetensors";
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Sniffed::Zip;
    }
    // safetensors: u64 header length (always < 4 GiB, so its high bytes are zero), then JSON.
    if let [_, _, _, _, 0, 0, 0, 0, b'{', ..] = head {
        return Sniffed::Safetensors;
    }
    if head.starts_with(&LEGACY_TORCH_MAGIC) {
        return Sniffed::Unsupported(format!(
            "legacy (pre-1.6, non-zip) PyTorch serialization, as written by \
             `torch.save(..., _use_new_zipfile_serialization=False)`; {LEGACY_ADVICE}"
        ));
    }
    if let [0x80, 2..=5, ..] = head {
        return Sniffed::Unsupported(format!(
            "a bare pickle stream, not a PyTorch zip checkpoint (perhaps the legacy PyTorch \
             serialization); {LEGACY_ADVICE}"
        ));
    }
    if head.is_empty() {
        return Sniffed::Unsupported("the file is empty".into());
    }
    let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Sniffed::Unsupported(format!("unrecognised leading bytes {}", hex.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn data(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data")
            .join(name)
    }

    /// `expected.json` (written by `tests/data/make_checkpoints.py`): fixture → key → tensor.
    fn expected() -> serde_json::Value {
        let text = std::fs::read_to_string(data("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn dtype_name(dtype: DType) -> &'static str {
        match dtype {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Open `file` and compare every tensor (keys, dtype, shape, each element bit for bit) with
    /// what torch recorded for `fixture` in expected.json.
    fn check_against_torch(file: &str, fixture: &str) -> Checkpoint {
        let ckpt = Checkpoint::open(&data(file)).unwrap();
        let all = expected();
        let want = all[fixture].as_object().unwrap();
        let keys: Vec<&str> = ckpt.keys().collect();
        let want_keys: Vec<&str> = want.keys().map(String::as_str).collect();
        assert_eq!(keys, want_keys, "{file}: keys");
        let mut buf = vec![123.0];
        for (key, t) in want {
            let meta = ckpt.meta(key).unwrap();
            assert_eq!(dtype_name(meta.dtype), t["dtype"], "{file}: dtype of {key}");
            let shape: Vec<usize> = t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(meta.shape, shape, "{file}: shape of {key}");
            let values: Vec<u32> = t["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| (v.as_f64().unwrap() as f32).to_bits())
                .collect();
            assert_eq!(values.len(), meta.numel());
            ckpt.read_f32_into(key, &mut buf).unwrap();
            let got: Vec<u32> = buf.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, values, "{file}: values of {key}");
            assert_eq!(ckpt.read_f32(key).unwrap(), buf);
        }
        ckpt
    }

    #[test]
    fn flat_fp32_matches_torch() {
        let ckpt = check_against_torch("flat_f32.pt", "flat_f32.pt");
        assert_eq!(ckpt.format(), Format::TorchZip);
        assert!(!ckpt.nested_state_dict());
        assert_eq!(ckpt.len(), 7);
        assert_eq!(ckpt.path(), data("flat_f32.pt"));
        // The zero in proj.bias is -0.0 and must stay so.
        assert_eq!(
            ckpt.read_f32("proj.bias").unwrap()[0].to_bits(),
            (-0.0f32).to_bits()
        );
    }

    #[test]
    fn pickle_protocol_4_matches_torch() {
        check_against_torch("flat_f32_proto4.pt", "flat_f32_proto4.pt");
    }

    #[test]
    fn nested_fp16_state_dict_matches_torch() {
        let ckpt = check_against_torch("nested_f16.ckpt", "nested_f16.ckpt");
        assert!(ckpt.nested_state_dict());
        assert_eq!(ckpt.meta("0.weight").unwrap().dtype, DType::F16);
        assert!(ckpt.meta("global_step").is_none());
    }

    #[test]
    fn bf16_matches_torch() {
        let ckpt = check_against_torch("bf16.pt", "bf16.pt");
        assert_eq!(
            ckpt.meta("temporal.pos_encoder.pe").unwrap(),
            &TensorMeta {
                dtype: DType::BF16,
                shape: vec![1, 6, 2]
            }
        );
    }

    #[test]
    fn strided_views_and_offsets_match_torch() {
        let ckpt = check_against_torch("views.pt", "views.pt");
        // Spot-check the transpose by hand: base[i][j] = (5 i + j) / 8, transposed[j][i].
        let t = ckpt.read_f32("transposed").unwrap();
        assert_eq!(&t[..4], &[0.0, 5.0 / 8.0, 10.0 / 8.0, 1.0 / 8.0]);
        assert_eq!(ckpt.read_f32("tail").unwrap()[0], -0.5);
    }

    #[test]
    fn deflated_entries_and_other_folder_name_match_torch() {
        check_against_torch("deflated.pt", "deflated.pt");
    }

    #[test]
    fn safetensors_matches_torch() {
        let ckpt = check_against_torch("tensors.safetensors", "tensors.safetensors");
        assert_eq!(ckpt.format(), Format::Safetensors);
        assert!(!ckpt.nested_state_dict());
        // Same tensors, same values as the .pt files.
        let pt = Checkpoint::open(&data("views.pt")).unwrap();
        assert_eq!(
            pt.read_f32("columns").unwrap(),
            ckpt.read_f32("columns").unwrap()
        );
    }

    #[test]
    fn malicious_pickle_is_refused() {
        let path = data("malicious.pt");
        match Checkpoint::open(&path) {
            Err(ExportError::UnsafePickle { path: p, global }) => {
                assert_eq!(p, path);
                assert!(
                    global == "posix.system" || global == "os.system",
                    "{global}"
                );
                let err = ExportError::UnsafePickle { path: p, global };
                let msg = err.to_string();
                assert!(
                    msg.contains("malicious.pt") && msg.contains("system"),
                    "{msg}"
                );
            }
            other => panic!("expected UnsafePickle, got {other:?}"),
        }
    }

    #[test]
    fn truncated_safetensors_is_malformed() {
        let path = data("truncated.safetensors");
        let err = Checkpoint::open(&path).unwrap_err();
        assert!(
            matches!(&err, ExportError::Malformed { path: p, format: "safetensors", .. } if *p == path),
            "{err:?}"
        );
        assert!(err.to_string().contains("truncated.safetensors"), "{err}");
    }

    #[test]
    fn short_storage_is_malformed_naming_the_tensor() {
        let path = data("short_storage.pt");
        let err = Checkpoint::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ExportError::Malformed { .. }), "{err:?}");
        assert!(msg.contains("short_storage.pt"), "{msg}");
        // `base` is the first (sorted) tensor on the cut storage.
        assert!(msg.contains("`base`"), "{msg}");
    }

    #[test]
    fn legacy_torch_format_is_explained() {
        let path = data("legacy.pt");
        match Checkpoint::open(&path) {
            Err(err @ ExportError::UnknownFormat { .. }) => {
                let msg = err.to_string();
                assert!(msg.contains("legacy.pt"), "{msg}");
                assert!(msg.contains("legacy (pre-1.6, non-zip) PyTorch"), "{msg}");
                assert!(msg.contains("re-save"), "{msg}");
            }
            other => panic!("expected UnknownFormat, got {other:?}"),
        }
    }

    #[test]
    fn text_file_is_unknown_format() {
        let path = data("not_a_checkpoint.txt");
        assert!(matches!(
            Checkpoint::open(&path),
            Err(ExportError::UnknownFormat { path: p, .. }) if p == path
        ));
    }

    #[test]
    fn missing_file_and_missing_key() {
        let err = Checkpoint::open(&data("does_not_exist.pt")).unwrap_err();
        assert!(matches!(err, ExportError::Io { .. }), "{err:?}");
        let ckpt = Checkpoint::open(&data("bf16.pt")).unwrap();
        let err = ckpt.read_f32("nope").unwrap_err();
        assert!(
            matches!(&err, ExportError::MissingTensor { tensor, .. } if tensor == "nope"),
            "{err:?}"
        );
    }

    /// Write `bytes` to a temporary file and open it.
    fn open_bytes(bytes: &[u8]) -> (tempfile::TempDir, PathBuf, Result<Checkpoint>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crafted.bin");
        std::fs::write(&path, bytes).unwrap();
        let result = Checkpoint::open(&path);
        (dir, path, result)
    }

    fn safetensors_bytes(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn assert_malformed(result: Result<Checkpoint>, path: &Path, needle: &str) {
        match result {
            Err(err @ ExportError::Malformed { .. }) => {
                let msg = err.to_string();
                assert!(msg.contains(&path.display().to_string()), "{msg}");
                assert!(msg.contains(needle), "{msg}");
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn crafted_safetensors_errors() {
        // Header that is not JSON.
        let (_d, path, r) = open_bytes(&safetensors_bytes("{not json at all", 0));
        assert_malformed(r, &path, "JSON");
        // Data offsets past the end of the file.
        let header = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let (_d, path, r) = open_bytes(&safetensors_bytes(header, 8));
        assert_malformed(r, &path, "truncated");
        // Offsets that do not match the shape: the tensor, its shape and both sizes named.
        let header = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#;
        let (_d, path, r) = open_bytes(&safetensors_bytes(header, 12));
        assert_malformed(r, &path, "tensor `w`: F32 [4] needs 16 bytes");
        let header = r#"{"a":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},"w":{"dtype":"F16","shape":[4],"data_offsets":[4,12]},"z":{"dtype":"I64","shape":[1],"data_offsets":[12,16]}}"#;
        let (_d, path, r) = open_bytes(&safetensors_bytes(header, 16));
        assert_malformed(r, &path, "tensor `z`: I64 [1] needs 8 bytes");
        // An element type we cannot represent is reported with the tensor's name.
        let header = r#"{"w":{"dtype":"U64","shape":[1],"data_offsets":[0,8]}}"#;
        let (_d, _path, r) = open_bytes(&safetensors_bytes(header, 8));
        assert!(
            matches!(r, Err(ExportError::UnsupportedDtype { ref tensor, .. }) if tensor == "w"),
            "{r:?}"
        );
        // A valid file reads back.
        let header = r#"{"w":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}}"#;
        let mut bytes = safetensors_bytes(header, 0);
        bytes.extend_from_slice(&[0xff, 0xff, 0x02, 0x00]);
        let (_d, _path, r) = open_bytes(&bytes);
        assert_eq!(r.unwrap().read_f32("w").unwrap(), vec![-1.0, 2.0]);
    }

    #[test]
    fn crafted_unknown_files() {
        let (_d, _p, r) = open_bytes(b"");
        assert!(matches!(r, Err(ExportError::UnknownFormat { .. })), "{r:?}");
        let (_d, _p, r) = open_bytes(b"\x80\x04\x95 some other pickle");
        match r {
            Err(err @ ExportError::UnknownFormat { .. }) => {
                assert!(err.to_string().contains("bare pickle"), "{err}")
            }
            other => panic!("{other:?}"),
        }
        // A zip that is not a torch checkpoint, and a damaged zip.
        let (_d, _p, r) = open_bytes(&std::fs::read(data("malicious.pt")).unwrap()[..30]);
        assert!(matches!(r, Err(ExportError::Malformed { .. })), "{r:?}");
    }

    #[test]
    fn checkpoint_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Checkpoint>();
    }
}
