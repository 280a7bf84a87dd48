//! Minimal reader and writer for NumPy `.npy` files (little-endian f32 / i64 / i32, C order).
//!
//! Used for the CLI's `--out FILE.npy` and for loading test fixtures; only the subset of the
//! format that those need is supported, and anything else is a clear error.

use std::io::Write;
use std::path::Path;

use crate::{Error, Result};

/// An array read from a `.npy` file, converted to `f32` or `i64` depending on its dtype.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray<T> {
    /// The shape, outermost first.
    pub shape: Vec<usize>,
    /// The values in C order.
    pub data: Vec<T>,
}

const MAGIC: &[u8] = b"\x93NUMPY";

/// Write a little-endian f32 array of the given shape.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let count: usize = shape.iter().product();
    if count != data.len() {
        return Err(Error::Request(format!(
            "npy {}: shape {shape:?} holds {count} values, got {}",
            path.display(),
            data.len()
        )));
    }
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Pad so that magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mut file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(&out).map_err(|e| Error::io(path, e))
}

struct Header {
    descr: String,
    shape: Vec<usize>,
    data_offset: usize,
}

fn bad(path: &Path, msg: &str) -> Error {
    Error::Request(format!("npy {}: {msg}", path.display()))
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad(path, "not a .npy file"));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad(path, "unsupported .npy version")),
    };
    let text = bytes
        .get(start..start + len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad(path, "truncated header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = text.find(&format!("'{key}'"))? + key.len() + 2;
        Some(text[at..].trim_start().trim_start_matches(':').trim_start())
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next())
        .ok_or_else(|| bad(path, "header has no descr"))?
        .to_string();
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(bad(path, "Fortran order is not supported"));
    }
    let shape_text = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad(path, "header has no shape"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad(path, "bad shape")))
        .collect::<Result<Vec<_>>>()?;
    Ok(Header {
        descr,
        shape,
        data_offset: start + len,
    })
}

fn read_raw(path: &Path) -> Result<(Header, Vec<u8>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let header = parse_header(path, &bytes)?;
    Ok((header, bytes))
}

fn elements<const N: usize>(path: &Path, h: &Header, bytes: &[u8]) -> Result<Vec<[u8; N]>> {
    // Checked: a corrupt header may declare an absurd shape.
    let body = h
        .shape
        .iter()
        .try_fold(N, |len, &d| len.checked_mul(d))
        .and_then(|len| bytes.get(h.data_offset..h.data_offset.checked_add(len)?))
        .ok_or_else(|| bad(path, "file shorter than its shape"))?;
    Ok(body
        .chunks_exact(N)
        .map(|c| c.try_into().expect("chunks_exact yields N bytes"))
        .collect())
}

/// Read an array of `<f4`, `<f8` or `<f2` values as f32.
pub fn read_f32(path: &Path) -> Result<NpyArray<f32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_f32(path, &bytes)
}

/// Parse the bytes of a `.npy` file holding `<f4`, `<f8` or `<f2` values as f32 (e.g. an
/// entry of an `.npz` archive); `path` names the data in error messages.
pub fn parse_f32(path: &Path, bytes: &[u8]) -> Result<NpyArray<f32>> {
    let h = parse_header(path, bytes)?;
    let data = match h.descr.as_str() {
        "<f4" => elements::<4>(path, &h, bytes)?
            .into_iter()
            .map(f32::from_le_bytes)
            .collect(),
        "<f8" => elements::<8>(path, &h, bytes)?
            .into_iter()
            .map(|b| f64::from_le_bytes(b) as f32)
            .collect(),
        "<f2" => elements::<2>(path, &h, bytes)?
            .into_iter()
            .map(|b| half::f16::from_le_bytes(b).to_f32())
            .collect(),
        other => return Err(bad(path, &format!("dtype {other} is not a float type"))),
    };
    Ok(NpyArray {
        shape: h.shape,
        data,
    })
}

/// Read an array of `<i8`, `<i4` integers (or `|u1`, `|b1`) as i64.
pub fn read_i64(path: &Path) -> Result<NpyArray<i64>> {
    let (h, bytes) = read_raw(path)?;
    let data = match h.descr.as_str() {
        "<i8" => elements::<8>(path, &h, &bytes)?
            .into_iter()
            .map(i64::from_le_bytes)
            .collect(),
        "<i4" => elements::<4>(path, &h, &bytes)?
            .into_iter()
            .map(|b| i32::from_le_bytes(b) as i64)
            .collect(),
        "|u1" | "|b1" => elements::<1>(path, &h, &bytes)?
            .into_iter()
            .map(|b| b[0] as i64)
            .collect(),
        other => return Err(bad(path, &format!("dtype {other} is not an integer type"))),
    };
    Ok(NpyArray {
        shape: h.shape,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trip() {
        let dir = std::env::temp_dir().join(format!("npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        write_f32(&path, &[2, 3, 4], &data).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_end = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!(header_end % 64, 0, "data must start 64-byte aligned");
        let back = read_f32(&path).unwrap();
        assert_eq!(back.shape, vec![2, 3, 4]);
        assert_eq!(back.data, data);
        assert!(read_i64(&path).is_err(), "f32 data is not integer data");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("npy-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.npy");
        std::fs::write(&path, b"hello").unwrap();
        assert!(read_f32(&path).is_err());
        let huge = b"\x93NUMPY\x01\x00\x50\x00{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }\n";
        let err = parse_f32(&path, huge).unwrap_err().to_string();
        assert!(err.contains("shorter than its shape"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
