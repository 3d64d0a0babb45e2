//! The on-disk token file of a store: six little-endian sections, each 64-byte aligned, in the
//! order prompt values, prompt offsets, chosen values, chosen offsets, rejected values, rejected
//! offsets. Values are int32, offsets int64 starting at 0. Each section carries a CRC-32.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;

use super::errors::{Result, RloxError};
use super::parts::Parts;
use super::store::Ints;

/// Where one section sits in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub dtype: &'static str,
    /// Byte offset in the file.
    pub offset: u64,
    /// Number of elements.
    pub count: u64,
    pub crc32: u32,
}

pub const ALIGN: u64 = 64;

/// CRC-32 (IEEE) of `bytes`, computed in parallel chunks and combined.
pub fn crc32(bytes: &[u8]) -> u32 {
    bytes
        .par_chunks(1 << 22)
        .map(|c| {
            let mut h = crc32fast::Hasher::new();
            h.update(c);
            h
        })
        .reduce(crc32fast::Hasher::new, |mut a, b| {
            a.combine(&b);
            a
        })
        .finalize()
}

fn io_err(path: &Path, e: std::io::Error) -> RloxError {
    RloxError::value("path", format!("{}: {e}", path.display()))
}

/// Streams little-endian bytes to the file while tracking position and checksum.
struct Out<'p> {
    w: BufWriter<File>,
    pos: u64,
    path: &'p Path,
    buf: Vec<u8>,
    hash: crc32fast::Hasher,
    start: u64,
    count: u64,
}

impl Out<'_> {
    /// Pad to the next aligned position and start a section there.
    fn begin(&mut self) -> Result<()> {
        let pad = (ALIGN - self.pos % ALIGN) % ALIGN;
        self.w
            .write_all(&vec![0u8; pad as usize])
            .map_err(|e| io_err(self.path, e))?;
        self.pos += pad;
        (self.start, self.count) = (self.pos, 0);
        self.hash = crc32fast::Hasher::new();
        Ok(())
    }

    fn push<I: Iterator<Item = [u8; N]>, const N: usize>(&mut self, items: I) -> Result<()> {
        for x in items {
            self.buf.extend_from_slice(&x);
            self.count += 1;
            if self.buf.len() >= 1 << 16 {
                self.drain()?;
            }
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<()> {
        self.hash.update(&self.buf);
        self.w
            .write_all(&self.buf)
            .map_err(|e| io_err(self.path, e))?;
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Finish the section: `(file offset, elements, CRC-32)`.
    fn end(&mut self) -> Result<(u64, u64, u32)> {
        self.drain()?;
        let hash = std::mem::replace(&mut self.hash, crc32fast::Hasher::new());
        Ok((self.start, self.count, hash.finalize()))
    }
}

/// Write the pairs of every part, in order, to `path` as one store (checked first: offsets, and
/// ids in `[0, 2^31)`). The caller renames the finished file into place, so a crash never leaves a
/// half-written store behind.
pub fn save(path: &Path, parts: &Parts<'_>) -> Result<Vec<Section>> {
    parts.validate(Some(i64::from(i32::MAX) + 1))?;
    let file = File::create(path).map_err(|e| io_err(path, e))?;
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, file),
        pos: 0,
        path,
        buf: Vec::with_capacity(1 << 17),
        hash: crc32fast::Hasher::new(),
        start: 0,
        count: 0,
    };
    let mut sections = Vec::with_capacity(6);
    for (c, name) in ["prompt", "chosen", "rejected"].into_iter().enumerate() {
        out.begin()?;
        for p in parts.parts() {
            let col = p.columns()[c];
            let (first, last) = (col.offsets.get(0), col.offsets.get(col.len()));
            match col.values.slice(first as usize, last as usize) {
                Ints::I32(v) => out.push(v.iter().map(|x| x.to_le_bytes()))?,
                Ints::I64(v) => out.push(v.iter().map(|&x| (x as i32).to_le_bytes()))?,
            }
        }
        let (offset, count, crc32) = out.end()?;
        sections.push(Section {
            name: format!("{name}_values"),
            dtype: "<i4",
            offset,
            count,
            crc32,
        });
        out.begin()?;
        out.push(std::iter::once(0i64.to_le_bytes()))?;
        let mut base = 0i64;
        for p in parts.parts() {
            let col = p.columns()[c];
            let first = col.offsets.get(0);
            let shift = base - first;
            out.push((1..=col.len()).map(|i| (col.offsets.get(i) + shift).to_le_bytes()))?;
            base += col.offsets.get(col.len()) - first;
        }
        let (offset, count, crc32) = out.end()?;
        sections.push(Section {
            name: format!("{name}_offsets"),
            dtype: "<i8",
            offset,
            count,
            crc32,
        });
    }
    out.w.flush().map_err(|e| io_err(path, e))?;
    out.w.get_ref().sync_all().map_err(|e| io_err(path, e))?;
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::{Column, PairColumns};

    #[test]
    fn parallel_crc_matches_sequential() {
        let data: Vec<u8> = (0..(9 << 20)).map(|i: u32| (i * 31 % 251) as u8).collect();
        let mut h = crc32fast::Hasher::new();
        h.update(&data);
        assert_eq!(crc32(&data), h.finalize());
    }

    #[test]
    fn writes_aligned_sections_with_rebased_offsets() {
        let v: Vec<i64> = vec![9, 1, 2, 3, 4, 5];
        let o = [1i64, 3, 5];
        let c = |n| Column::new(n, Ints::I64(&v), Ints::I64(&o)).unwrap();
        let cols = PairColumns::new(c("prompt"), c("chosen"), c("rejected")).unwrap();
        let path = std::env::temp_dir().join(format!("rlox-disk-{}.bin", std::process::id()));
        let s = save(&path, &Parts::new(vec![cols, cols])).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.len(), 6);
        assert!(s.iter().all(|x| x.offset % ALIGN == 0));
        assert_eq!((s[0].count, s[1].count), (8, 5));
        let at = s[1].offset as usize;
        let off: Vec<i64> = (0..5)
            .map(|k| i64::from_le_bytes(bytes[at + 8 * k..at + 8 * k + 8].try_into().unwrap()))
            .collect();
        assert_eq!(off, vec![0, 2, 4, 6, 8]);
        assert_eq!(&bytes[0..4], &1i32.to_le_bytes());
        assert_eq!(s[0].crc32, crc32(&bytes[0..32]));
    }
}
