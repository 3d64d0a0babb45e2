//! Batch planning: which pairs go together, in which order, and on which rank.
//!
//! One epoch's plan is a list of rounds; a round holds one batch per rank, so every rank sees the
//! same number of batches and every pair appears exactly once per epoch (unless `drop_last`).
//! The plan depends only on the pair lengths, the options, `seed` and `epoch`.

use rayon::prelude::*;

use super::collate::{batch_shape, cut, CollateOptions, Cut, Layout};
use super::errors::{Result, RloxError};

/// Planning options; `collate` gives the layout and truncation used to cost a batch.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    pub batch_size: Option<usize>,
    pub max_tokens: Option<usize>,
    pub shuffle: bool,
    pub seed: u64,
    pub epoch: u64,
    pub group_by_length: bool,
    pub drop_last: bool,
    pub rank: usize,
    pub world_size: usize,
    /// Number of batches per rank whose pairs are sorted by length together.
    pub group_batches: usize,
    pub collate: CollateOptions,
}

impl PlanOptions {
    fn validate(&self) -> Result<()> {
        self.collate.validate()?;
        match (self.batch_size, self.max_tokens) {
            (None, None) | (Some(_), Some(_)) => {
                return Err(RloxError::value(
                    "batch_size",
                    "give exactly one of batch_size (pairs per batch) and max_tokens",
                ))
            }
            (Some(0), _) => return Err(RloxError::value("batch_size", "must be >= 1, got 0")),
            (_, Some(0)) => return Err(RloxError::value("max_tokens", "must be >= 1, got 0")),
            _ => {}
        }
        if self.world_size == 0 {
            return Err(RloxError::value("world_size", "must be >= 1, got 0"));
        }
        if self.rank >= self.world_size {
            return Err(RloxError::value(
                "rank",
                format!(
                    "must be < world_size ({}), got {}",
                    self.world_size, self.rank
                ),
            ));
        }
        if self.group_batches == 0 {
            return Err(RloxError::value("group_batches", "must be >= 1, got 0"));
        }
        Ok(())
    }
}

/// One rank's batches: batch `k` is `indices[offsets[k]..offsets[k + 1]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub indices: Vec<i64>,
    pub offsets: Vec<i64>,
}

/// SplitMix64: a small, fast generator with the same stream on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, epoch: u64) -> Self {
        let mut r = Rng(seed ^ 0x5851_F42D_4C95_7F2D);
        r.0 =
            r.0.wrapping_add(r.next().wrapping_mul(epoch.wrapping_add(1)));
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift with rejection, so exactly uniform).
    fn below(&mut self, n: u64) -> u64 {
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The truncated lengths of every pair (`None`: no completion token left).
pub fn cuts(lengths: [&[i64]; 3], o: &CollateOptions) -> Vec<Option<Cut>> {
    let [p, c, r] = lengths;
    (0..p.len())
        .into_par_iter()
        .with_min_len(4096)
        .map(|i| {
            let len = |x: i64| x.max(0) as usize;
            cut(len(p[i]), len(c[i]), len(r[i]), o)
        })
        .collect()
}

/// The length a pair is sorted by, and its token cost, in a layout.
fn key(c: &Option<Cut>, layout: Layout) -> usize {
    let Some(c) = c else { return 0 };
    match layout {
        Layout::Padded => c.prompt + c.chosen.max(c.rejected),
        Layout::PrefixShared => c.prompt + c.chosen + c.rejected,
        Layout::Packed => 2 * c.prompt + c.chosen + c.rejected,
    }
}

/// Cost in tokens (including padding) of a batch of `n` pairs whose longest key is `longest`
/// and whose keys sum to `sum`.
fn cost(n: usize, longest: usize, sum: usize, o: &CollateOptions) -> usize {
    match o.layout {
        Layout::Padded => n.saturating_mul(2).saturating_mul(o.round(longest)),
        _ if o.packs_rows() => sum,
        Layout::PrefixShared => n.saturating_mul(o.round(longest)),
        Layout::Packed => sum,
    }
}

/// Split `items` into `parts` contiguous pieces whose sizes differ by at most one.
fn split_even(items: &[i64], parts: usize) -> Vec<Vec<i64>> {
    let (q, r) = (items.len() / parts, items.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut at = 0;
    for k in 0..parts {
        let n = q + usize::from(k < r);
        out.push(items[at..at + n].to_vec());
        at += n;
    }
    out
}

/// Token-budget batches over `order` (already grouped); first-fit-decreasing for packed layouts.
fn budget_batches(
    order: &[i64],
    keys: &[usize],
    budget: usize,
    o: &CollateOptions,
    ffd: bool,
) -> Vec<Vec<i64>> {
    if ffd {
        let mut sorted = order.to_vec();
        sorted.sort_by_key(|&i| std::cmp::Reverse(keys[i as usize]));
        let mut bins: Vec<(usize, Vec<i64>)> = Vec::new();
        for i in sorted {
            let k = keys[i as usize];
            match bins.iter_mut().find(|(fill, _)| fill + k <= budget) {
                Some((fill, items)) => {
                    *fill += k;
                    items.push(i);
                }
                None => bins.push((k, vec![i])),
            }
        }
        return bins.into_iter().map(|b| b.1).collect();
    }
    let mut out = Vec::new();
    let mut cur: Vec<i64> = Vec::new();
    let (mut longest, mut sum) = (0, 0);
    for &i in order {
        let k = keys[i as usize];
        let (l2, s2) = (longest.max(k), sum + k);
        if !cur.is_empty() && cost(cur.len() + 1, l2, s2, o) > budget {
            out.push(std::mem::take(&mut cur));
            (longest, sum) = (k, k);
        } else {
            (longest, sum) = (l2, s2);
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Plan one epoch for one rank from `(n,)` prompt, chosen and rejected lengths.
pub fn plan(lengths: [&[i64]; 3], o: &PlanOptions) -> Result<Plan> {
    o.validate()?;
    let n = lengths[0].len();
    let ws = o.world_size;
    let cuts = cuts(lengths, &o.collate);
    let keys: Vec<usize> = cuts.iter().map(|c| key(c, o.collate.layout)).collect();
    let mut rng = Rng::new(o.seed, o.epoch);
    let mut order: Vec<i64> = (0..n as i64).collect();
    if o.shuffle {
        rng.shuffle(&mut order);
    }
    let per_batch = match (o.batch_size, o.max_tokens) {
        (Some(b), _) => b,
        (_, Some(t)) => {
            let mean = keys.iter().sum::<usize>().max(1) as f64 / n.max(1) as f64;
            let per_pair = match o.collate.layout {
                Layout::Padded => 2.0 * mean,
                _ => mean,
            };
            ((t as f64 / per_pair) as usize).max(1)
        }
        _ => unreachable!("validated"),
    };
    let group = o
        .group_batches
        .saturating_mul(per_batch)
        .saturating_mul(ws)
        .max(1);
    if o.group_by_length {
        order
            .par_chunks_mut(group)
            .for_each(|g| g.sort_by_key(|&i| std::cmp::Reverse(keys[i as usize])));
    }

    let mut rounds: Vec<Vec<Vec<i64>>> = Vec::new();
    if let Some(bs) = o.batch_size {
        let full = bs.saturating_mul(ws);
        let (whole, rest) = (n / full, n % full);
        let mut bounds: Vec<(usize, usize)> =
            (0..whole).map(|k| (k * full, (k + 1) * full)).collect();
        if rest > 0 && !o.drop_last {
            if rest >= ws {
                bounds.push((whole * full, n));
            } else if let Some(last) = bounds.last_mut() {
                // Too few pairs left for every rank: fold them into the previous round.
                last.1 = n;
            } else {
                return Err(RloxError::value(
                    "world_size",
                    format!("{n} pairs cannot give each of {ws} ranks a batch"),
                ));
            }
        }
        rounds.extend(bounds.iter().map(|&(s, e)| split_even(&order[s..e], ws)));
    } else {
        let budget = o.max_tokens.unwrap_or(usize::MAX);
        let ffd = o.group_by_length && o.collate.packs_rows();
        let mut batches: Vec<Vec<i64>> = order
            .par_chunks(group)
            .flat_map_iter(|g| budget_batches(g, &keys, budget, &o.collate, ffd))
            .collect();
        if batches.len() % ws != 0 {
            if o.drop_last {
                batches.truncate(batches.len() - batches.len() % ws);
            } else {
                let batch_cost = |b: &[i64]| -> usize {
                    let ks = b.iter().map(|&i| keys[i as usize]);
                    cost(b.len(), ks.clone().max().unwrap_or(0), ks.sum(), &o.collate)
                };
                let infeasible = || {
                    RloxError::value(
                        "world_size",
                        format!(
                            "{n} pairs cannot be planned into a multiple of {ws} batches within \
                             max_tokens={budget}; use drop_last or change max_tokens"
                        ),
                    )
                };
                let mut split = true;
                while batches.len() % ws != 0 {
                    let (big, size) = batches
                        .iter()
                        .enumerate()
                        .map(|(k, b)| (k, b.len()))
                        .max_by_key(|&(k, len)| (len, std::cmp::Reverse(k)))
                        .unwrap_or((0, 0));
                    if split && size >= 2 {
                        let tail = batches[big].split_off(size / 2);
                        batches.insert(big + 1, tail);
                        continue;
                    }
                    // Only single pairs left to split: merge the two cheapest batches instead.
                    split = false;
                    if batches.len() < 2 {
                        return Err(infeasible());
                    }
                    let mut order: Vec<usize> = (0..batches.len()).collect();
                    order.sort_by_key(|&k| (batch_cost(&batches[k]), k));
                    let (a, b) = (order[0].min(order[1]), order[0].max(order[1]));
                    let mut merged = batches[a].clone();
                    merged.extend_from_slice(&batches[b]);
                    if batch_cost(&merged) > budget {
                        return Err(infeasible());
                    }
                    batches.remove(b);
                    batches[a] = merged;
                }
            }
        }
        let mut it = batches.into_iter();
        while let Some(first) = it.next() {
            let mut round = vec![first];
            round.extend(it.by_ref().take(ws - 1));
            rounds.push(round);
        }
    }
    if o.shuffle {
        rng.shuffle(&mut rounds);
        // The most expensive round goes first, so running out of memory shows at once.
        let round_cost = |r: &Vec<Vec<i64>>| -> usize {
            r.iter()
                .map(|b| {
                    let ks = b.iter().map(|&i| keys[i as usize]);
                    cost(b.len(), ks.clone().max().unwrap_or(0), ks.sum(), &o.collate)
                })
                .max()
                .unwrap_or(0)
        };
        if let Some(top) = (0..rounds.len()).max_by_key(|&k| (round_cost(&rounds[k]), k)) {
            rounds.swap(0, top);
        }
    }
    let mut indices = Vec::with_capacity(n / ws + 1);
    let mut offsets = Vec::with_capacity(rounds.len() + 1);
    offsets.push(0);
    for round in &rounds {
        indices.extend_from_slice(&round[o.rank]);
        offsets.push(indices.len() as i64);
    }
    Ok(Plan { indices, offsets })
}

/// Real tokens and total slots (including padding) of collating `batches` under `o`.
pub fn layout_tokens(
    lengths: [&[i64]; 3],
    batches: &Plan,
    o: &CollateOptions,
) -> Result<(u64, u64)> {
    o.validate()?;
    let cuts = cuts(lengths, o);
    let (real, slots) = batches
        .offsets
        .par_windows(2)
        .map(|w| {
            let b: Vec<Cut> = batches.indices[w[0] as usize..w[1] as usize]
                .iter()
                .filter_map(|&i| cuts[i as usize])
                .collect();
            let (rows, len, real) = batch_shape(&b, o);
            (real as u64, (rows * len) as u64)
        })
        .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    Ok((real, slots))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(bs: Option<usize>, tokens: Option<usize>) -> PlanOptions {
        PlanOptions {
            batch_size: bs,
            max_tokens: tokens,
            shuffle: true,
            seed: 3,
            epoch: 0,
            group_by_length: true,
            drop_last: false,
            rank: 0,
            world_size: 1,
            group_batches: 4,
            collate: CollateOptions {
                max_length: Some(64),
                ..CollateOptions::padded()
            },
        }
    }

    fn lens(n: usize) -> [Vec<i64>; 3] {
        let f = |a: usize, m: usize| (0..n).map(|i| ((i * a) % m + 1) as i64).collect();
        [f(7, 13), f(11, 17), f(5, 9)]
    }

    fn all_ranks(l: &[Vec<i64>; 3], o: PlanOptions) -> Vec<Plan> {
        (0..o.world_size)
            .map(|rank| plan([&l[0], &l[1], &l[2]], &PlanOptions { rank, ..o }).unwrap())
            .collect()
    }

    #[test]
    fn every_pair_once_across_ranks_same_batch_counts() {
        let l = lens(103);
        for (bs, tok, ws) in [
            (Some(4), None, 1),
            (Some(4), None, 3),
            (Some(1), None, 5),
            (None, Some(120), 2),
            (None, Some(50), 4),
        ] {
            let plans = all_ranks(
                &l,
                PlanOptions {
                    world_size: ws,
                    ..opts(bs, tok)
                },
            );
            let mut seen: Vec<i64> = plans.iter().flat_map(|p| p.indices.clone()).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..103).collect::<Vec<_>>(), "{bs:?} {tok:?} {ws}");
            let counts: Vec<usize> = plans.iter().map(|p| p.offsets.len()).collect();
            assert!(counts.iter().all(|&c| c == counts[0]));
            assert!(plans
                .iter()
                .all(|p| p.offsets.windows(2).all(|w| w[1] > w[0])));
        }
    }

    #[test]
    fn deterministic_per_seed_and_epoch() {
        let l = lens(50);
        let a = all_ranks(&l, opts(Some(4), None));
        assert_eq!(a, all_ranks(&l, opts(Some(4), None)));
        let b = all_ranks(
            &l,
            PlanOptions {
                epoch: 1,
                ..opts(Some(4), None)
            },
        );
        assert_ne!(a, b);
    }

    #[test]
    fn drop_last_and_too_few_pairs() {
        let l = lens(10);
        let p = all_ranks(
            &l,
            PlanOptions {
                drop_last: true,
                ..opts(Some(4), None)
            },
        );
        assert_eq!(p[0].indices.len(), 8);
        let e = plan(
            [&l[0][..2], &l[1][..2], &l[2][..2]],
            &PlanOptions {
                world_size: 3,
                ..opts(Some(1), None)
            },
        )
        .unwrap_err();
        assert_eq!(e.field, "world_size");
    }

    #[test]
    fn token_budget_is_respected() {
        let l = lens(200);
        let o = opts(None, Some(100));
        let p = plan([&l[0], &l[1], &l[2]], &o).unwrap();
        let cs = cuts([&l[0], &l[1], &l[2]], &o.collate);
        for w in p.offsets.windows(2) {
            let b: Vec<Cut> = p.indices[w[0] as usize..w[1] as usize]
                .iter()
                .filter_map(|&i| cs[i as usize])
                .collect();
            let (rows, len, _) = batch_shape(&b, &o.collate);
            assert!(rows * len <= 100 || b.len() == 1);
        }
    }
}
