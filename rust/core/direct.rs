//! Positioned reads of a batch's token runs straight from the store files (`O_DIRECT`), for
//! shuffled access to stores larger than memory.
//!
//! A memory map reads whole 4 KiB pages, so a ~1 KiB token run costs 4-8 KiB from disk. Direct
//! reads fetch each run's sectors only (512 B granularity where the device allows it), issued in
//! parallel and merged where they touch, into buffers owned by the batch. The page cache is
//! bypassed, so a warm store is faster through the map. Runs that lie in no registered file
//! (in-memory parts) are used where they are.

use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::errors::{Result, RloxError};
use super::store::{Ints, PairRef};

#[cfg(target_os = "linux")]
const DIRECT_FLAG: i32 = libc::O_DIRECT;
/// Elsewhere the reads go through the page cache: the same bytes, without the saving.
#[cfg(not(target_os = "linux"))]
const DIRECT_FLAG: i32 = 0;

/// Buffer memory alignment (covers every device's logical block size).
const BLOCK: usize = 4096;
/// Reads in flight at once: they wait on the device, not the CPU.
const IO_THREADS: usize = 32;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; BLOCK]);

/// One store file and the address range where it is memory-mapped in this process.
#[derive(Debug)]
struct Mapped {
    base: usize,
    len: usize,
    file: File,
}

/// The files of a store opened for direct reads, keyed by their mapped address ranges.
#[derive(Debug)]
pub struct DirectFiles {
    maps: Vec<Mapped>,
    /// Offset and length granularity of reads (the device's logical block size).
    align: usize,
}

/// One merged read: file `map`, bytes `[start, start + len)` (aligned).
struct Range {
    map: usize,
    start: u64,
    len: usize,
}

/// The runs of one batch, read into owned buffers.
pub struct DirectRuns {
    buffers: Vec<Vec<Block>>,
    /// Per run (3 per pair): `(buffer, byte offset in it)`, or `None` to keep the mapped run.
    at: Vec<Option<(usize, usize)>>,
}

/// The I/O pool of this process. A forked child (a `DataLoader` worker) inherits the parent's
/// pool without its threads, so each process builds its own.
fn pool() -> Arc<rayon::ThreadPool> {
    static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    match slot.as_ref() {
        Some((owner, pool)) if *owner == pid => Arc::clone(pool),
        _ => {
            let pool = Arc::new(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(IO_THREADS)
                    .thread_name(|i| format!("rlox-io-{i}"))
                    .build()
                    .expect("the I/O thread pool starts"),
            );
            if let Some((_, stale)) = slot.replace((pid, Arc::clone(&pool))) {
                std::mem::forget(stale); // its threads live only in the parent
            }
            pool
        }
    }
}

fn io_error(path: &str, e: std::io::Error) -> RloxError {
    RloxError::value("path", format!("{path}: direct read failed ({e})"))
}

fn bytes_mut(blocks: &mut [Block]) -> &mut [u8] {
    // SAFETY: `Block` is `repr(C)` plain bytes with no padding; the length covers exactly them.
    unsafe {
        std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), blocks.len() * BLOCK)
    }
}

fn bytes(blocks: &[Block]) -> &[u8] {
    // SAFETY: as in `bytes_mut`.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), blocks.len() * BLOCK) }
}

/// Read `need` bytes at aligned `start` (asking for `len`, aligned) into fresh buffers.
fn read_range(
    file: &File,
    start: u64,
    len: usize,
    need: usize,
    align: usize,
) -> std::io::Result<Vec<Block>> {
    let mut buf = vec![Block([0; BLOCK]); len.div_ceil(BLOCK)];
    let out = bytes_mut(&mut buf);
    let mut got = 0;
    while got < need {
        let n = file.read_at(&mut out[got..len], start + got as u64)?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        // A short read may end off the sector grid; the next read restarts on it.
        got = if got + n >= need {
            got + n
        } else {
            (got + n) / align * align
        };
    }
    Ok(buf)
}

impl DirectFiles {
    /// Open `files` (`(path, mapped base address, mapped length)`) with `O_DIRECT`. Fails where
    /// the file system refuses direct I/O (tmpfs, some network file systems).
    pub fn open(files: &[(String, usize, usize)]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut align = 512;
        for (path, base, len) in files {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(DIRECT_FLAG)
                .open(path)
                .map_err(|e| io_error(path, e))?;
            // Probe the sector size: 512-byte reads work on most devices, else 4 KiB.
            if *len >= 2 * BLOCK && read_range(&file, 512, 512, 512, 512).is_err() {
                align = BLOCK;
                read_range(&file, 0, BLOCK, BLOCK, BLOCK).map_err(|e| io_error(path, e))?;
            }
            maps.push(Mapped {
                base: *base,
                len: *len,
                file,
            });
        }
        Ok(Self { maps, align })
    }

    /// `(file, byte offset)` of a run whose memory lies in a registered mapping.
    fn locate(&self, run: &Ints<'_>) -> Option<(usize, u64, usize)> {
        let Ints::I32(v) = run else { return None };
        let (addr, len) = (v.as_ptr() as usize, std::mem::size_of_val(*v));
        if len == 0 {
            return None;
        }
        let k = self
            .maps
            .iter()
            .position(|m| m.base <= addr && addr + len <= m.base + m.len)?;
        Some((k, (addr - self.maps[k].base) as u64, len))
    }

    /// Read every token run of `pairs` from disk.
    pub fn read(&self, pairs: &[PairRef<'_>]) -> Result<DirectRuns> {
        let a = self.align as u64;
        let mut runs: Vec<(usize, u64, usize, usize)> = pairs
            .iter()
            .flat_map(|p| [p.prompt, p.chosen, p.rejected])
            .enumerate()
            .filter_map(|(r, run)| self.locate(&run).map(|(k, off, len)| (k, off, len, r)))
            .collect();
        runs.sort_unstable();
        let mut ranges: Vec<Range> = Vec::new();
        let mut at = vec![None; pairs.len() * 3];
        let mut needs: Vec<usize> = Vec::new();
        for &(map, off, len, r) in &runs {
            let (start, end) = (off / a * a, (off + len as u64).div_ceil(a) * a);
            match ranges.last_mut() {
                Some(last) if last.map == map && start <= last.start + last.len as u64 => {
                    last.len = last.len.max((end - last.start) as usize);
                    let need = needs.last_mut().expect("one need per range");
                    *need = (*need).max((off + len as u64 - last.start) as usize);
                }
                _ => {
                    ranges.push(Range {
                        map,
                        start,
                        len: (end - start) as usize,
                    });
                    needs.push((off + len as u64 - start) as usize);
                }
            }
            let last = ranges.last().expect("a range per run");
            at[r] = Some((ranges.len() - 1, (off - last.start) as usize));
        }
        let buffers = pool().install(|| {
            ranges
                .par_iter()
                .zip(&needs)
                .map(|(g, &need)| {
                    let file = &self.maps[g.map].file;
                    read_range(file, g.start, g.len, need, self.align)
                        .map_err(|e| io_error(&format!("store file {}", g.map), e))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(DirectRuns { buffers, at })
    }
}

impl DirectRuns {
    /// `pairs` with each registered run replaced by its copy read from disk.
    pub fn pairs<'b>(&'b self, pairs: &[PairRef<'b>]) -> Vec<PairRef<'b>> {
        let run = |r: usize, orig: Ints<'b>| -> Ints<'b> {
            let (Some((b, off)), Ints::I32(v)) = (self.at[r], orig) else {
                return orig;
            };
            let raw = &bytes(&self.buffers[b])[off..off + std::mem::size_of_val(v)];
            // SAFETY: any 4 bytes are a valid i32; `align_to` only yields aligned elements.
            let (head, ints, tail) = unsafe { raw.align_to::<i32>() };
            if head.is_empty() && tail.is_empty() {
                Ints::I32(ints)
            } else {
                orig
            }
        };
        pairs
            .iter()
            .enumerate()
            .map(|(i, p)| PairRef {
                index: p.index,
                prompt: run(3 * i, p.prompt),
                chosen: run(3 * i + 1, p.chosen),
                rejected: run(3 * i + 2, p.rejected),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn runs_read_from_the_file_equal_the_mapped_ones() {
        let values: Vec<i32> = (0..20_000).map(|i| i * 7 - 3).collect();
        // Under target/, on the build's disk (a tmpfs temporary directory refuses O_DIRECT).
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join(format!("rlox-direct-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("values.bin");
        let mut f = File::create(&path).unwrap();
        for v in &values {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
        drop(f);
        // The in-memory copy stands in for the mapping: same bytes, same offsets.
        let base = values.as_ptr() as usize;
        let files = [(path.to_string_lossy().into_owned(), base, values.len() * 4)];
        let direct = DirectFiles::open(&files).unwrap();
        let other = vec![5i32; 3];
        let pair = |a: usize, b: usize, c: usize, n: usize| PairRef {
            index: a,
            prompt: Ints::I32(&values[a..a + n]),
            chosen: Ints::I32(&values[b..b + 1]),
            rejected: Ints::I32(&values[c..c + n]),
        };
        let mut pairs = vec![
            pair(0, 1, 19_990, 10),
            pair(127, 128, 129, 300),
            pair(5000, 17, 4000, 1),
        ];
        pairs[2].chosen = Ints::I32(&other);
        let runs = direct.read(&pairs).unwrap();
        let read = runs.pairs(&pairs);
        for (p, q) in pairs.iter().zip(&read) {
            for (x, y) in [
                (p.prompt, q.prompt),
                (p.chosen, q.chosen),
                (p.rejected, q.rejected),
            ] {
                let (Ints::I32(x), Ints::I32(y)) = (x, y) else {
                    panic!("int32 runs")
                };
                assert_eq!(x, y);
            }
        }
        let Ints::I32(kept) = read[2].chosen else {
            panic!("int32 run")
        };
        assert_eq!(kept.as_ptr(), other.as_ptr());
        let Ints::I32(fresh) = read[1].prompt else {
            panic!("int32 run")
        };
        assert!(!(base..base + values.len() * 4).contains(&(fresh.as_ptr() as usize)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
