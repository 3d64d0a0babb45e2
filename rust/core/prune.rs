//! Filtering and deduplication over a store: which pairs to keep, and why the others go.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use rayon::prelude::*;

use super::errors::{Result, RloxError};
use super::parts::Parts;
use super::store::{Ints, PairRef};

/// Length bounds (tokens, inclusive) and the identical-completion rule of [`filter`].
#[derive(Debug, Clone, Default)]
pub struct FilterOptions {
    pub min_prompt_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    /// Bounds on each completion (chosen and rejected).
    pub min_completion_length: Option<usize>,
    pub max_completion_length: Option<usize>,
    /// Bound on prompt + the longer completion.
    pub max_length: Option<usize>,
    /// Drop pairs whose chosen and rejected ids are the same.
    pub drop_identical: bool,
}

/// The reasons a pair is dropped, in the order they are checked; a pair counts under the first.
pub const REASONS: [&str; 4] = ["prompt_length", "completion_length", "length", "identical"];

fn outside(n: usize, lo: Option<usize>, hi: Option<usize>) -> bool {
    lo.is_some_and(|lo| n < lo) || hi.is_some_and(|hi| n > hi)
}

fn same(a: Ints<'_>, b: Ints<'_>) -> bool {
    a.len() == b.len() && (0..a.len()).all(|j| a.get(j) == b.get(j))
}

/// Why pair `p` is dropped (an index into [`REASONS`]), or `None` to keep it.
fn verdict(p: &PairRef<'_>, o: &FilterOptions) -> Option<usize> {
    let (lp, lc, lr) = (p.prompt.len(), p.chosen.len(), p.rejected.len());
    if outside(lp, o.min_prompt_length, o.max_prompt_length) {
        return Some(0);
    }
    let (lo, hi) = (o.min_completion_length, o.max_completion_length);
    if outside(lc, lo, hi) || outside(lr, lo, hi) {
        return Some(1);
    }
    if o.max_length.is_some_and(|m| lp + lc.max(lr) > m) {
        return Some(2);
    }
    if o.drop_identical && same(p.chosen, p.rejected) {
        return Some(3);
    }
    None
}

/// Every global index of `parts`, in order, in runs of at most 65,536 pairs.
fn runs(n: usize) -> impl ParallelIterator<Item = Vec<i64>> {
    (0..n.div_ceil(1 << 16))
        .into_par_iter()
        .map(move |r| ((r << 16) as i64..((r + 1) << 16).min(n) as i64).collect())
}

/// The indices of the pairs that pass `o` (ascending), and the count dropped for each of
/// [`REASONS`]. Pairs are read with their offsets checked; lengths come from offsets alone.
pub fn filter(parts: &Parts<'_>, o: &FilterOptions) -> Result<(Vec<i64>, [u64; 4])> {
    for (name, lo, hi) in [
        (
            "min_prompt_length",
            o.min_prompt_length,
            o.max_prompt_length,
        ),
        (
            "min_completion_length",
            o.min_completion_length,
            o.max_completion_length,
        ),
    ] {
        if let (Some(lo), Some(hi)) = (lo, hi) {
            if lo > hi {
                return Err(RloxError::value(
                    name,
                    format!("{lo} exceeds the maximum {hi}"),
                ));
            }
        }
    }
    let chunks: Vec<(Vec<i64>, [u64; 4])> = runs(parts.len())
        .map(|idx| {
            let mut kept = Vec::with_capacity(idx.len());
            let mut dropped = [0u64; 4];
            for p in parts.pairs(&idx, None)? {
                match verdict(&p, o) {
                    Some(r) => dropped[r] += 1,
                    None => kept.push(p.index as i64),
                }
            }
            Ok((kept, dropped))
        })
        .collect::<Result<_>>()?;
    let mut dropped = [0u64; 4];
    let mut kept = Vec::with_capacity(parts.len());
    for (k, d) in chunks {
        kept.extend(k);
        dropped.iter_mut().zip(d).for_each(|(a, b)| *a += b);
    }
    Ok((kept, dropped))
}

fn hash_pair(p: &PairRef<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    for run in [p.prompt, p.chosen, p.rejected] {
        run.len().hash(&mut h);
        match run {
            Ints::I32(v) => v.iter().for_each(|&x| i64::from(x).hash(&mut h)),
            Ints::I64(v) => v.hash(&mut h),
        }
    }
    h.finish()
}

fn same_pair(a: &PairRef<'_>, b: &PairRef<'_>) -> bool {
    same(a.prompt, b.prompt) && same(a.chosen, b.chosen) && same(a.rejected, b.rejected)
}

/// The indices (ascending) of the first occurrence of every distinct (prompt, chosen, rejected)
/// token triple. Pairs are grouped by a 64-bit hash, and equal hashes are compared token by
/// token, so a hash collision never drops a pair.
pub fn deduplicate(parts: &Parts<'_>) -> Result<Vec<i64>> {
    let mut keyed: Vec<(u64, i64)> = runs(parts.len())
        .map(|idx| {
            Ok(parts
                .pairs(&idx, None)?
                .iter()
                .map(|p| (hash_pair(p), p.index as i64))
                .collect::<Vec<_>>())
        })
        .collect::<Result<Vec<_>>>()?
        .concat();
    keyed.par_sort_unstable();
    let groups: Vec<&[(u64, i64)]> = keyed.chunk_by(|a, b| a.0 == b.0).collect();
    let kept: Vec<Vec<i64>> = groups
        .par_iter()
        .map(|g| {
            if g.len() == 1 {
                return Ok(vec![g[0].1]);
            }
            let idx: Vec<i64> = g.iter().map(|x| x.1).collect();
            let pairs = parts.pairs(&idx, None)?;
            let mut first: Vec<&PairRef<'_>> = Vec::new();
            for p in &pairs {
                if !first.iter().any(|q| same_pair(q, p)) {
                    first.push(p);
                }
            }
            Ok(first.iter().map(|p| p.index as i64).collect())
        })
        .collect::<Result<_>>()?;
    let mut kept = kept.concat();
    kept.par_sort_unstable();
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::store::{Column, PairColumns};

    #[test]
    fn filter_counts_each_reason_once() {
        // prompts [1], [1,2], [1]; chosen [5], [5,6,7], [4]; rejected [5], [6], [3]
        let (pv, po) = ([1, 1, 2, 1], [0i64, 1, 3, 4]);
        let (cv, co) = ([5, 5, 6, 7, 4], [0i64, 1, 4, 5]);
        let (rv, ro) = ([5, 6, 3], [0i64, 1, 2, 3]);
        let c = |n, v, o| Column::new(n, Ints::I32(v), Ints::I64(o)).unwrap();
        let cols = PairColumns::new(
            c("prompt", &pv, &po),
            c("chosen", &cv, &co),
            c("rejected", &rv, &ro),
        )
        .unwrap();
        let parts = Parts::new(vec![cols]);
        let o = FilterOptions {
            max_completion_length: Some(2),
            drop_identical: true,
            ..Default::default()
        };
        let (kept, dropped) = filter(&parts, &o).unwrap();
        assert_eq!((kept, dropped), (vec![2], [0, 1, 0, 1]));
        let o = FilterOptions {
            max_length: Some(3),
            ..Default::default()
        };
        assert_eq!(filter(&parts, &o).unwrap(), (vec![0, 2], [0, 0, 1, 0]));
        let bad = FilterOptions {
            min_prompt_length: Some(3),
            max_prompt_length: Some(2),
            ..Default::default()
        };
        assert_eq!(filter(&parts, &bad).unwrap_err().field, "min_prompt_length");
        let twice = Parts::new(vec![cols, cols]);
        assert_eq!(deduplicate(&twice).unwrap(), vec![0, 1, 2]);
    }
}
