//! Ragged token columns (Arrow style: flat values + `n + 1` offsets) and the three-column pair
//! store they form. Nothing here owns memory: columns borrow numpy, Arrow or memory-mapped buffers.
//!
//! Opening a column only checks its first and last offsets (O(1)), so a memory-mapped store opens
//! instantly. Every access to a row re-checks that row's offsets, so a corrupted store yields an
//! error naming the column and the pair, never a panic. [`PairColumns::validate`] checks all rows.

use rayon::prelude::*;

use super::errors::{Result, RloxError};

/// A read-only run of integers of either width.
#[derive(Debug, Clone, Copy)]
pub enum Ints<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl<'a> Ints<'a> {
    pub fn len(&self) -> usize {
        match self {
            Ints::I32(v) => v.len(),
            Ints::I64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> i64 {
        match self {
            Ints::I32(v) => i64::from(v[i]),
            Ints::I64(v) => v[i],
        }
    }

    pub fn slice(&self, start: usize, end: usize) -> Ints<'a> {
        match self {
            Ints::I32(v) => Ints::I32(&v[start..end]),
            Ints::I64(v) => Ints::I64(&v[start..end]),
        }
    }

    /// Ask the CPU to start loading these ids into cache (a hint; no effect on results).
    pub fn prefetch(&self) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let (ptr, bytes) = match self {
                Ints::I32(v) => (v.as_ptr().cast::<i8>(), std::mem::size_of_val(*v)),
                Ints::I64(v) => (v.as_ptr().cast::<i8>(), std::mem::size_of_val(*v)),
            };
            for off in (0..bytes).step_by(64) {
                // SAFETY: `off < bytes`, so the address lies inside the borrowed slice; a
                // prefetch never faults and does not change memory.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.add(off)) };
            }
        }
    }

    /// Write the values into `dst` (same length) as `i64`.
    pub fn write_to(&self, dst: &mut [std::mem::MaybeUninit<i64>]) {
        match self {
            Ints::I32(v) => dst.iter_mut().zip(*v).for_each(|(d, &s)| {
                d.write(i64::from(s));
            }),
            Ints::I64(v) => dst.iter_mut().zip(*v).for_each(|(d, &s)| {
                d.write(s);
            }),
        }
    }

    /// The smallest and largest value, or `None` when empty.
    pub fn min_max(&self) -> Option<(i64, i64)> {
        // Separate min and max reductions vectorise; a fused fold over a tuple does not.
        match self {
            Ints::I32(v) => Some((i64::from(*v.iter().min()?), i64::from(*v.iter().max()?))),
            Ints::I64(v) => Some((*v.iter().min()?, *v.iter().max()?)),
        }
    }
}

/// One ragged column: row `i` is `values[offsets[i]..offsets[i + 1]]`.
#[derive(Debug, Clone, Copy)]
pub struct Column<'a> {
    pub name: &'static str,
    pub values: Ints<'a>,
    pub offsets: Ints<'a>,
}

impl<'a> Column<'a> {
    /// O(1) checks: at least one offset, first offset >= 0, last offset within the values.
    pub fn new(name: &'static str, values: Ints<'a>, offsets: Ints<'a>) -> Result<Self> {
        let field = format!("{name}_offsets");
        if offsets.is_empty() {
            return Err(RloxError::value(
                &field,
                "needs n + 1 entries (a leading 0), got an empty array",
            ));
        }
        let (first, last) = (offsets.get(0), offsets.get(offsets.len() - 1));
        if first < 0 || last < first || last as u64 > values.len() as u64 {
            // Name the first bad row (a scan, on the error path only).
            let column = Self {
                name,
                values,
                offsets,
            };
            if let Some(i) = (0..offsets.len() - 1).find(|&i| column.span(i).is_err()) {
                return Err(column.span(i).unwrap_err());
            }
            return Err(RloxError::value(
                &field,
                format!(
                    "offsets run from {first} to {last}, outside the {} {name} values",
                    values.len()
                ),
            ));
        }
        Ok(Self {
            name,
            values,
            offsets,
        })
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(start, end)` of row `i` in `values`, checked.
    pub fn span(&self, i: usize) -> Result<(usize, usize)> {
        let (s, e) = (self.offsets.get(i), self.offsets.get(i + 1));
        if s < 0 || e < s || e as u64 > self.values.len() as u64 {
            return Err(RloxError::at(
                &format!("{}_offsets", self.name),
                i,
                format!(
                    "offsets {s}..{e} are decreasing or outside the {} values",
                    self.values.len()
                ),
            ));
        }
        Ok((s as usize, e as usize))
    }

    /// Row `i`, checked (offsets only; see [`check_ids`] for the tokens).
    pub fn row(&self, i: usize) -> Result<Ints<'a>> {
        let (s, e) = self.span(i)?;
        Ok(self.values.slice(s, e))
    }

    /// Length of row `i` without checking (0 for a decreasing span).
    pub fn row_len(&self, i: usize) -> i64 {
        (self.offsets.get(i + 1) - self.offsets.get(i)).max(0)
    }
}

/// Ids must be non-negative and below `vocab_size` when given; returns the largest id (-1 for
/// no ids).
pub fn check_ids(field: &str, i: usize, ids: Ints<'_>, vocab_size: Option<i64>) -> Result<i64> {
    let Some((lo, hi)) = ids.min_max() else {
        return Ok(-1);
    };
    if lo < 0 {
        return Err(RloxError::at(field, i, format!("negative token id {lo}")));
    }
    if let Some(v) = vocab_size {
        if hi >= v {
            return Err(RloxError::at(
                field,
                i,
                format!("token id {hi} is outside the vocabulary (vocab_size={v})"),
            ));
        }
    }
    Ok(hi)
}

/// [`check_ids`] over a pair's three runs, naming the pair's store index.
pub fn check_pair_ids(p: &PairRef<'_>, vocab_size: Option<i64>) -> Result<()> {
    for (name, run) in [
        ("prompt", p.prompt),
        ("chosen", p.chosen),
        ("rejected", p.rejected),
    ] {
        check_ids(name, p.index, run, vocab_size)?;
    }
    Ok(())
}

/// One pair's three token runs, and the pair's index in the store.
#[derive(Debug, Clone, Copy)]
pub struct PairRef<'a> {
    pub index: usize,
    pub prompt: Ints<'a>,
    pub chosen: Ints<'a>,
    pub rejected: Ints<'a>,
}

/// The prompt, chosen and rejected columns of a store; all have the same number of rows.
#[derive(Debug, Clone, Copy)]
pub struct PairColumns<'a> {
    pub prompt: Column<'a>,
    pub chosen: Column<'a>,
    pub rejected: Column<'a>,
}

impl<'a> PairColumns<'a> {
    pub fn new(prompt: Column<'a>, chosen: Column<'a>, rejected: Column<'a>) -> Result<Self> {
        let n = prompt.len();
        for c in [&chosen, &rejected] {
            if c.len() != n {
                return Err(RloxError::value(
                    c.name,
                    format!("has {} rows but prompt has {n}", c.len()),
                ));
            }
        }
        Ok(Self {
            prompt,
            chosen,
            rejected,
        })
    }

    pub fn len(&self) -> usize {
        self.prompt.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn columns(&self) -> [&Column<'a>; 3] {
        [&self.prompt, &self.chosen, &self.rejected]
    }

    /// Pair `i` with every check: offsets, non-empty runs, ids in range.
    pub fn pair(&self, i: usize, vocab_size: Option<i64>) -> Result<PairRef<'a>> {
        self.pair_max(i, Some(vocab_size)).map(|(p, _)| p)
    }

    /// Pair `i` with its offsets checked, and with its ids checked against `ids` (`Some(vocab)`)
    /// or not (`None`: the store was validated before); also the largest id seen (-1 unchecked).
    pub(crate) fn pair_max(
        &self,
        i: usize,
        ids: Option<Option<i64>>,
    ) -> Result<(PairRef<'a>, i64)> {
        let mut runs = [Ints::I32(&[]); 3];
        let mut max = -1;
        for (run, col) in runs.iter_mut().zip(self.columns()) {
            let row = col.row(i)?;
            if row.is_empty() {
                let what = if col.name == "prompt" {
                    "empty prompt; at least one token is needed to predict the first completion token"
                } else {
                    "empty completion"
                };
                return Err(RloxError::at(col.name, i, what));
            }
            if let Some(vocab_size) = ids {
                max = max.max(check_ids(col.name, i, row, vocab_size)?);
            }
            *run = row;
        }
        let pair = PairRef {
            index: i,
            prompt: runs[0],
            chosen: runs[1],
            rejected: runs[2],
        };
        Ok((pair, max))
    }

    /// Check every pair (in parallel); the error names the first bad pair. Returns the largest
    /// token id of the store.
    pub fn validate(&self, vocab_size: Option<i64>) -> Result<i64> {
        let checked = (0..self.len())
            .into_par_iter()
            .with_min_len(1024)
            .map(|i| self.pair_max(i, Some(vocab_size)).map(|(_, m)| m))
            .try_reduce(|| -1, |a, b| Ok(a.max(b)));
        if checked.is_ok() {
            return checked;
        }
        // Some pair failed; report the first one.
        let bad = (0..self.len())
            .into_par_iter()
            .with_min_len(1024)
            .find_first(|&i| self.pair(i, vocab_size).is_err())
            .expect("a pair failed validation");
        self.pair(bad, vocab_size).map(|_| -1)
    }

    /// The pairs at `indices` (in parallel for many), offsets always checked; ids checked
    /// against `ids` (`Some(vocab_size)`), or not (`None`) when the store is known valid.
    /// The error names the first bad pair.
    pub fn pairs(&self, indices: &[i64], ids: Option<Option<i64>>) -> Result<Vec<PairRef<'a>>> {
        let n = self.len();
        let get = |(k, &i): (usize, &i64)| {
            // Negative indices count from the end, as in Python.
            let i = if i < 0 { i.wrapping_add(n as i64) } else { i };
            if i < 0 || i as u64 >= n as u64 {
                return Err(RloxError::at(
                    "indices",
                    k,
                    format!("pair index {i} is out of range for {n} pairs"),
                ));
            }
            self.pair_max(i as usize, ids).map(|(p, _)| p)
        };
        let got: Vec<Result<PairRef<'a>>> = if indices.len() >= 4096 {
            indices.par_iter().enumerate().map(get).collect()
        } else {
            indices.iter().enumerate().map(get).collect()
        };
        got.into_iter().collect()
    }

    /// `(n,)` prompt, chosen and rejected lengths (unchecked offsets give 0 for a bad span).
    pub fn lengths(&self) -> [Vec<i64>; 3] {
        self.columns().map(|c| {
            (0..c.len())
                .into_par_iter()
                .with_min_len(4096)
                .map(|i| c.row_len(i))
                .collect()
        })
    }
}

/// Owned integers of either width (the result of `Parts::take`).
#[derive(Debug, Clone, PartialEq)]
pub enum IntsBuf {
    I32(Vec<i32>),
    I64(Vec<i64>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col<'a>(name: &'static str, v: &'a [i32], o: &'a [i64]) -> Column<'a> {
        Column::new(name, Ints::I32(v), Ints::I64(o)).unwrap()
    }

    #[test]
    fn rows_and_lengths() {
        let (pv, po) = ([1, 2, 3], [0i64, 2, 3]);
        let (cv, co) = ([4, 5, 6], [0i64, 1, 3]);
        let (rv, ro) = ([7, 8], [0i64, 1, 2]);
        let s = PairColumns::new(col("prompt", &pv, &po), col("chosen", &cv, &co), {
            col("rejected", &rv, &ro)
        })
        .unwrap();
        assert_eq!(s.len(), 2);
        let p = s.pair(1, None).unwrap();
        assert_eq!((p.prompt.get(0), p.chosen.len()), (3, 2));
        assert_eq!(s.lengths()[1], vec![1, 2]);
        s.validate(Some(9)).unwrap();
        let e = s.validate(Some(8)).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("rejected", Some(1)));
    }

    #[test]
    fn corrupt_offsets_are_errors() {
        let v = [1, 2, 3];
        assert!(Column::new("prompt", Ints::I32(&v), Ints::I64(&[0, 4])).is_err());
        assert!(Column::new("prompt", Ints::I32(&v), Ints::I64(&[])).is_err());
        let c = col("chosen", &v, &[0, 2, 1, 3]);
        let e = c.row(1).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("chosen_offsets", Some(1)));
        let (e1, o1) = ([1], [0i64, 1, 1]);
        let s = PairColumns::new(col("prompt", &v, &[0, 1, 3]), col("chosen", &e1, &o1), {
            col("rejected", &v, &[0, 1, 3])
        })
        .unwrap();
        let e = s.validate(None).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("chosen", Some(1)));
        let e = s.pairs(&[0, 2], Some(None)).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("indices", Some(1)));
    }
}
