//! NumPy `.npy` files (format versions 1–3): read float32/float64/float16/int64/int32 arrays in C
//! order, write float32 and int64; and `.npz` archives of them (`np.savez`, stored, and
//! `np.savez_compressed`, deflated). Enough to exchange inputs and outputs with numpy and PyTorch.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// npy errors; each names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct NpyError {
    pub path: PathBuf,
    pub message: String,
}

fn err(path: &Path, message: impl Into<String>) -> NpyError {
    NpyError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Array data as stored (converted to the nearest type motionrt computes with).
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// One array: shape and row-major data.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
    /// The dtype descriptor as stored (`<f4`, `<i8`, ...).
    pub dtype: String,
}

impl NpyArray {
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            shape,
            data: NpyData::F32(data),
            dtype: "<f4".into(),
        }
    }

    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        Self {
            shape,
            data: NpyData::I64(data),
            dtype: "<i8".into(),
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            NpyData::F32(v) => v.len(),
            NpyData::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Parse `.npy` bytes; `path` names the source in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<NpyArray, NpyError> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(err(path, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err(err(path, "truncated header"));
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(err(path, format!("unsupported .npy format version {v}"))),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or_else(|| err(path, "truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| err(path, "header is not text"))?;
    let descr = dict_value(header, "descr")
        .and_then(|v| v.strip_prefix('\'').and_then(|v| v.split('\'').next()))
        .ok_or_else(|| err(path, format!("header has no 'descr': {header}")))?
        .to_string();
    let fortran = dict_value(header, "fortran_order")
        .ok_or_else(|| err(path, "header has no 'fortran_order'"))?;
    if fortran.starts_with("True") {
        return Err(err(
            path,
            "Fortran-ordered arrays are not supported (save with np.ascontiguousarray)",
        ));
    }
    let shape_text = dict_value(header, "shape")
        .and_then(|v| v.strip_prefix('('))
        .and_then(|v| v.split(')').next())
        .ok_or_else(|| err(path, format!("header has no 'shape': {header}")))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| err(path, format!("bad shape ({shape_text})")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n: usize = shape.iter().product();
    let body = &bytes[start + header_len..];
    let need = |size: usize| -> Result<&[u8], NpyError> {
        body.get(..n * size).ok_or_else(|| {
            err(
                path,
                format!(
                    "data is {} bytes; shape {shape:?} of {descr} needs {}",
                    body.len(),
                    n * size
                ),
            )
        })
    };
    let data = match descr.as_str() {
        "<f4" => NpyData::F32(
            need(4)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        "<f8" => NpyData::F32(
            need(8)?
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
        ),
        "<f2" => NpyData::F32(
            need(2)?
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        "<i8" => NpyData::I64(
            need(8)?
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        "<i4" => NpyData::I64(
            need(4)?
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        ),
        other => {
            return Err(err(
                path,
                format!("dtype {other} is not supported (use float32, float64, float16, int64 or int32, little-endian)"),
            ))
        }
    };
    Ok(NpyArray {
        shape,
        data,
        dtype: descr,
    })
}

/// The text after `'key':` in a Python dict literal, trimmed.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("'{key}':");
    let i = header.find(&pat)?;
    Some(header[i + pat.len()..].trim_start())
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // subnormal: normalise
            let mut e = 127 - 15 + 1;
            let mut m = mant;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        0x1f => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// Read a `.npy` file.
pub fn read(path: &Path) -> Result<NpyArray, NpyError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e.to_string()))?;
    parse(path, &bytes)
}

/// `.npy` bytes (format 1.0) of an array.
pub fn to_bytes(a: &NpyArray) -> Vec<u8> {
    let descr = match a.data {
        NpyData::F32(_) => "<f4",
        NpyData::I64(_) => "<i8",
    };
    let shape = match a.shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", a.shape[0]),
        _ => format!(
            "({})",
            a.shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so the data starts on a 64-byte boundary; the header ends with a newline.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + a.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match &a.data {
        NpyData::F32(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        NpyData::I64(v) => v
            .iter()
            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out
}

/// Write a `.npy` file atomically (temporary name, then rename).
pub fn write(path: &Path, a: &NpyArray) -> Result<(), NpyError> {
    let tmp = path.with_extension("npy.partial");
    let _unfinished = motionrt_kernels::unfinished::register(&tmp);
    let res = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&to_bytes(a)).and_then(|_| f.sync_all()))
        .and_then(|_| motionrt_kernels::unfinished::commit(|| std::fs::rename(&tmp, path)));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(path, e.to_string()));
    }
    Ok(())
}

/// Read every array of an `.npz` archive, in archive order; names without the `.npy` suffix.
pub fn read_npz(path: &Path) -> Result<Vec<(String, NpyArray)>, NpyError> {
    let file = std::fs::File::open(path).map_err(|e| err(path, e.to_string()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| err(path, format!("not an .npz (zip) archive: {e}")))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut f = zip
            .by_index(i)
            .map_err(|e| err(path, format!("entry {i}: {e}")))?;
        if f.is_dir() {
            continue;
        }
        let entry = f
            .name()
            .map_err(|e| err(path, format!("entry {i}: {e}")))?
            .to_string();
        let name = entry.strip_suffix(".npy").unwrap_or(&entry).to_string();
        let mut bytes = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut bytes)
            .map_err(|e| err(path, format!("{entry}: {e}")))?;
        let arr = parse(&path.join(&entry), &bytes)?;
        out.push((name, arr));
    }
    Ok(out)
}

/// Write arrays as an `.npz` archive (stored, like `np.savez`), atomically.
pub fn write_npz(path: &Path, arrays: &[(String, NpyArray)]) -> Result<(), NpyError> {
    let tmp = path.with_extension("npz.partial");
    let _unfinished = motionrt_kernels::unfinished::register(&tmp);
    let res = (|| -> Result<(), String> {
        let file = std::fs::File::create(&tmp).map_err(|e| e.to_string())?;
        let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        for (name, a) in arrays {
            zip.start_file(format!("{name}.npy"), opts)
                .map_err(|e| format!("{name}: {e}"))?;
            zip.write_all(&to_bytes(a))
                .map_err(|e| format!("{name}: {e}"))?;
        }
        let w = zip.finish().map_err(|e| e.to_string())?;
        let f = w.into_inner().map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        motionrt_kernels::unfinished::commit(|| std::fs::rename(&tmp, path))
            .map_err(|e| e.to_string())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(path, e));
    }
    Ok(())
}

/// Arrays from an `.npz` file or a directory of `.npy` files (names from the file stems, sorted).
pub fn read_arrays(path: &Path) -> Result<Vec<(String, NpyArray)>, NpyError> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| err(path, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "npy"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(err(path, "no .npy files in this directory"));
        }
        files
            .iter()
            .map(|p| {
                let name = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                read(p).map(|a| (name, a))
            })
            .collect()
    } else {
        read_npz(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_i64() {
        let p = Path::new("mem.npy");
        for a in [
            NpyArray::f32(
                vec![2, 3],
                vec![1.0, -2.5, 3.25, 0.0, f32::MIN_POSITIVE, 7.0],
            ),
            NpyArray::f32(vec![4], vec![1.0, 2.0, 3.0, 4.0]),
            NpyArray::f32(vec![], vec![9.5]),
            NpyArray::i64(vec![1, 2], vec![-3, 49407]),
        ] {
            let bytes = to_bytes(&a);
            let data_bytes = match a.data {
                NpyData::F32(_) => 4 * a.len(),
                NpyData::I64(_) => 8 * a.len(),
            };
            assert_eq!((bytes.len() - data_bytes) % 64, 0, "data 64-byte aligned");
            assert_eq!(parse(p, &bytes).unwrap(), a);
        }
    }

    #[test]
    fn reads_numpy_written_header_and_f16() {
        // Header as numpy 2.x writes it for np.array([1.0, -2.0, 0.5, 65504.0], dtype='<f2').
        let mut b = Vec::new();
        let header = "{'descr': '<f2', 'fortran_order': False, 'shape': (4,), }";
        let mut h = header.to_string();
        h.push_str(&" ".repeat(128 - 10 - header.len() - 1));
        h.push('\n');
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&[1, 0]);
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        for x in [0x3c00u16, 0xc000, 0x3800, 0x7bff] {
            b.extend_from_slice(&x.to_le_bytes());
        }
        let a = parse(Path::new("h.npy"), &b).unwrap();
        assert_eq!(a.shape, vec![4]);
        assert_eq!(a.data, NpyData::F32(vec![1.0, -2.0, 0.5, 65504.0]));
    }

    #[test]
    fn npz_round_trip_and_directories() {
        let d = tempfile_dir();
        let arrays = vec![
            (
                "sample".to_string(),
                NpyArray::f32(vec![2, 2], vec![0.5, -1.0, 2.0, 3.0]),
            ),
            (
                "input_ids".to_string(),
                NpyArray::i64(vec![1, 3], vec![49406, 7, 49407]),
            ),
        ];
        let p = d.join("a.npz");
        write_npz(&p, &arrays).unwrap();
        assert_eq!(read_npz(&p).unwrap(), arrays);
        assert!(!d.join("a.npz.partial").exists());
        let dir = d.join("npys");
        std::fs::create_dir_all(&dir).unwrap();
        for (n, a) in &arrays {
            write(&dir.join(format!("{n}.npy")), a).unwrap();
        }
        let back = read_arrays(&dir).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].0, "input_ids");
        assert_eq!(back[1], arrays[0]);
        let e = read_npz(&dir.join("input_ids.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an .npz"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "motionrt-npy-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn errors_name_the_problem() {
        let p = Path::new("x.npy");
        assert!(parse(p, b"hello world")
            .unwrap_err()
            .to_string()
            .contains("x.npy: not a .npy file"));
        let mut bytes = to_bytes(&NpyArray::f32(vec![3], vec![1.0, 2.0, 3.0]));
        bytes.truncate(bytes.len() - 4);
        let e = parse(p, &bytes).unwrap_err().to_string();
        assert!(e.contains("needs 12"), "{e}");
        let mut bytes = to_bytes(&NpyArray::f32(vec![1], vec![1.0]));
        let at = bytes.windows(3).position(|w| w == b"<f4").unwrap();
        bytes[at] = b'>';
        let e = parse(p, &bytes).unwrap_err().to_string();
        assert!(e.contains("dtype >f4 is not supported"), "{e}");
    }
}
