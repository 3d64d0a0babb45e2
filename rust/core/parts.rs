//! A store made of parts read as one: global pair `i` is pair `i - starts[k]` of part `k`.
//! Streamed stores, sharded stores and concatenations are all several [`PairColumns`]; a plain
//! store is one part. Errors name the global pair index.

use rayon::prelude::*;

use super::errors::{Result, RloxError};
use super::store::{Ints, IntsBuf, PairColumns, PairRef};

/// Several pair stores, in order, seen as one.
#[derive(Debug, Clone)]
pub struct Parts<'a> {
    parts: Vec<PairColumns<'a>>,
    /// `parts.len() + 1` running pair counts from 0.
    starts: Vec<usize>,
}

impl<'a> Parts<'a> {
    pub fn new(parts: Vec<PairColumns<'a>>) -> Self {
        let mut starts = Vec::with_capacity(parts.len() + 1);
        starts.push(0);
        for p in &parts {
            starts.push(starts.last().copied().unwrap_or(0) + p.len());
        }
        Self { parts, starts }
    }

    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn parts(&self) -> &[PairColumns<'a>] {
        &self.parts
    }

    /// The first global index of each part, and the total (`parts + 1` entries).
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// `(part, index in part)` of global pair `i < len()`.
    pub fn locate(&self, i: usize) -> (usize, usize) {
        let k = self.starts.partition_point(|&s| s <= i) - 1;
        (k, i - self.starts[k])
    }

    /// An error from part `k` with its pair index made global.
    fn global(&self, k: usize, mut e: RloxError) -> RloxError {
        if e.field != "indices" {
            e.index = e.index.map(|i| i + self.starts[k]);
        }
        e
    }

    /// Global pair `i` (checked against `len()`), as [`PairColumns::pairs`] checks it.
    fn pair_at(&self, k: usize, i: i64, ids: Option<Option<i64>>) -> Result<PairRef<'a>> {
        let n = self.len();
        // Negative indices count from the end, as in Python.
        let i = if i < 0 { i.wrapping_add(n as i64) } else { i };
        if i < 0 || i as u64 >= n as u64 {
            return Err(RloxError::at(
                "indices",
                k,
                format!("pair index {i} is out of range for {n} pairs"),
            ));
        }
        let (part, local) = self.locate(i as usize);
        let (mut pair, _) = self.parts[part]
            .pair_max(local, ids)
            .map_err(|e| self.global(part, e))?;
        pair.index = i as usize;
        Ok(pair)
    }

    /// The pairs at `indices`; see [`PairColumns::pairs`].
    pub fn pairs(&self, indices: &[i64], ids: Option<Option<i64>>) -> Result<Vec<PairRef<'a>>> {
        let get = |(k, &i): (usize, &i64)| self.pair_at(k, i, ids);
        if indices.len() >= 4096 {
            indices.par_iter().enumerate().map(get).collect()
        } else {
            indices.iter().enumerate().map(get).collect()
        }
    }

    /// Check every pair of every part; returns the largest token id (-1 for no ids).
    pub fn validate(&self, vocab_size: Option<i64>) -> Result<i64> {
        let mut max = -1;
        for (k, p) in self.parts.iter().enumerate() {
            max = max.max(p.validate(vocab_size).map_err(|e| self.global(k, e))?);
        }
        Ok(max)
    }

    /// `(n,)` prompt, chosen and rejected lengths over all parts.
    pub fn lengths(&self) -> [Vec<i64>; 3] {
        let mut out: [Vec<i64>; 3] = Default::default();
        for p in &self.parts {
            for (o, l) in out.iter_mut().zip(p.lengths()) {
                if o.is_empty() {
                    *o = l;
                } else {
                    o.extend_from_slice(&l);
                }
            }
        }
        out
    }

    /// Rows `indices` of column `c` (0 prompt, 1 chosen, 2 rejected) as compact values and
    /// offsets from 0; int32 when every part stores int32 values.
    pub fn take(&self, c: usize, indices: &[i64]) -> Result<(IntsBuf, Vec<i64>)> {
        let n = self.len();
        let rows: Vec<Ints<'a>> = indices
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                if i < 0 || i as u64 >= n as u64 {
                    return Err(RloxError::at(
                        "indices",
                        k,
                        format!("pair index {i} is out of range for {n} pairs"),
                    ));
                }
                let (part, local) = self.locate(i as usize);
                self.parts[part].columns()[c]
                    .row(local)
                    .map_err(|e| self.global(part, e))
            })
            .collect::<Result<_>>()?;
        let mut offsets = Vec::with_capacity(rows.len() + 1);
        offsets.push(0i64);
        for r in &rows {
            offsets.push(offsets[offsets.len() - 1] + r.len() as i64);
        }
        let narrow = self
            .parts
            .iter()
            .all(|p| matches!(p.columns()[c].values, Ints::I32(_)));
        let values = if narrow {
            IntsBuf::I32(gather(&rows, &offsets, |r, d: &mut [i32]| {
                if let Ints::I32(v) = r {
                    d.copy_from_slice(v)
                }
            }))
        } else {
            IntsBuf::I64(gather(&rows, &offsets, |r, d: &mut [i64]| {
                d.iter_mut().enumerate().for_each(|(j, x)| *x = r.get(j))
            }))
        };
        Ok((values, offsets))
    }

    /// Every id of column `c` in pair order, as int64, in runs of at most `chunk` ids: `f` gets
    /// each run (the last may be shorter).
    pub fn for_each_chunk(&self, c: usize, chunk: usize, mut f: impl FnMut(&[i64])) {
        let mut buf = Vec::with_capacity(chunk);
        for p in &self.parts {
            let col = p.columns()[c];
            let (first, last) = (col.offsets.get(0) as usize, col.offsets.get(col.len()));
            let values = col.values.slice(first, last as usize);
            let mut j = 0;
            while j < values.len() {
                let take = (chunk - buf.len()).min(values.len() - j);
                buf.extend((j..j + take).map(|t| values.get(t)));
                j += take;
                if buf.len() == chunk {
                    f(&buf);
                    buf.clear();
                }
            }
        }
        if !buf.is_empty() {
            f(&buf);
        }
    }
}

/// Copy each row into its place of a new flat buffer (rows in parallel).
fn gather<T: Copy + Default + Send + Sync>(
    rows: &[Ints<'_>],
    offsets: &[i64],
    copy: impl Fn(&Ints<'_>, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::default(); offsets.last().copied().unwrap_or(0) as usize];
    let mut pieces = Vec::with_capacity(rows.len());
    let mut rest = out.as_mut_slice();
    for r in rows {
        let (head, tail) = rest.split_at_mut(r.len());
        pieces.push(head);
        rest = tail;
    }
    pieces
        .into_par_iter()
        .zip(rows.par_iter())
        .with_min_len(256)
        .for_each(|(dst, r)| copy(r, dst));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::Column;

    fn store<'a>(v: &'a [i32], o: &'a [i64]) -> PairColumns<'a> {
        let c = |n| Column::new(n, Ints::I32(v), Ints::I64(o)).unwrap();
        PairColumns::new(c("prompt"), c("chosen"), c("rejected")).unwrap()
    }

    #[test]
    fn parts_read_as_one_store() {
        let (v1, o1) = ([1, 2, 3], [0i64, 1, 3]);
        let (v2, o2) = ([7, 8], [0i64, 2]);
        let none: [i64; 1] = [0];
        let p = Parts::new(vec![store(&v1, &o1), store(&[], &none), store(&v2, &o2)]);
        assert_eq!((p.len(), p.locate(2)), (3, (2, 0)));
        let pairs = p.pairs(&[2, 0, -2], Some(None)).unwrap();
        assert_eq!(pairs.iter().map(|x| x.index).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(pairs[0].chosen.get(1), 8);
        assert_eq!(p.lengths()[1], vec![1, 2, 2]);
        let (values, offsets) = p.take(0, &[2, 1]).unwrap();
        assert_eq!(values, IntsBuf::I32(vec![7, 8, 2, 3]));
        assert_eq!(offsets, vec![0, 2, 4]);
        assert_eq!(p.validate(Some(9)).unwrap(), 8);
        let e = p.validate(Some(8)).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("prompt", Some(2)));
        let e = p.pairs(&[0, 3], None).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("indices", Some(1)));
        let mut runs = Vec::new();
        p.for_each_chunk(0, 2, |r| runs.push(r.to_vec()));
        assert_eq!(runs, vec![vec![1, 2], vec![3, 7], vec![8]]);
    }
}
