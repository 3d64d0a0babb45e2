//! Collation of preference pairs into model-ready rows in three layouts, with one gather plan.
//!
//! For a pair with prompt `p` (P tokens), chosen `c` (C) and rejected `r` (R):
//! - `padded`: row `j` is `p c`, row `B + j` is `p r`, right-padded to the longest row.
//! - `packed`: the 2B sequences `p c` and `p r` are placed first-fit-decreasing into rows of at
//!   most `pack_length` tokens (one row when unset); positions restart at 0 in every sequence and
//!   padding only ever sits at the end of a row.
//! - `prefix_shared`: row `j` is `p c r`; positions run `0..P+C` then `P..P+R`, so `r` takes the
//!   positions `c` takes, and `r` must attend to `p` and to itself only (see `segment_ends`).
//!
//! The gather plan lists every completion token once: the row and position whose logits predict
//! it, its id, its pair and its side (0 chosen, 1 rejected). Summing log-softmax at those points by
//! (side, pair) gives the same sequence log-probs in every layout.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::attn;
use super::errors::{Result, RloxError};
use super::store::{check_ids, Ints, PairRef};

/// How pairs are laid out in rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Padded,
    Packed,
    PrefixShared,
}

impl Layout {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "padded" => Ok(Self::Padded),
            "packed" => Ok(Self::Packed),
            "prefix_shared" => Ok(Self::PrefixShared),
            _ => Err(RloxError::value(
                "layout",
                format!(
                    "unknown layout {s:?}; expected \"padded\", \"packed\" or \"prefix_shared\""
                ),
            )),
        }
    }
}

/// Which end of an over-long prompt is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncation {
    /// Keep the last tokens (those next to the completion).
    KeepEnd,
    /// Keep the first tokens.
    KeepStart,
}

impl Truncation {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "keep_end" => Ok(Self::KeepEnd),
            "keep_start" => Ok(Self::KeepStart),
            _ => Err(RloxError::value(
                "truncation",
                format!("unknown truncation mode {s:?}; expected \"keep_end\" or \"keep_start\""),
            )),
        }
    }
}

/// Batches of at least this many cells are filled by the thread pool.
pub const PARALLEL_CELLS: usize = 1 << 20;

/// Largest batch, in cells (`rows * length`), that collation builds.
pub const MAX_CELLS: usize = 1 << 32;

/// Collation options (see the Python `PreferenceDataset.collate` for their documentation).
#[derive(Debug, Clone, Copy)]
pub struct CollateOptions {
    pub layout: Layout,
    /// Longest `prompt + completion` sequence; `None`: no truncation.
    pub max_length: Option<usize>,
    pub max_prompt_length: Option<usize>,
    pub truncation: Truncation,
    /// Id written into padding slots (they are masked out either way).
    pub pad_token_id: i64,
    pub pad_to_multiple_of: Option<usize>,
    /// Token budget of a packed row; `None`: one row.
    pub pack_length: Option<usize>,
}

impl CollateOptions {
    pub fn padded() -> Self {
        Self {
            layout: Layout::Padded,
            max_length: None,
            max_prompt_length: None,
            truncation: Truncation::KeepEnd,
            pad_token_id: 0,
            pad_to_multiple_of: None,
            pack_length: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(m) = self.max_length {
            if m < 2 {
                return Err(RloxError::value(
                    "max_length",
                    format!("must be >= 2 (a prompt token and a completion token), got {m}"),
                ));
            }
        }
        if self.max_prompt_length == Some(0) {
            return Err(RloxError::value("max_prompt_length", "must be >= 1, got 0"));
        }
        if self.pad_to_multiple_of == Some(0) {
            return Err(RloxError::value(
                "pad_to_multiple_of",
                "must be >= 1, got 0",
            ));
        }
        if let (Some(p), Some(m)) = (self.pack_length, self.max_length) {
            if p < m {
                return Err(RloxError::value(
                    "pack_length",
                    format!("must be >= max_length ({m}) so every sequence fits a row, got {p}"),
                ));
            }
        }
        if self.pack_length == Some(0) {
            return Err(RloxError::value("pack_length", "must be >= 1, got 0"));
        }
        Ok(())
    }

    /// Round a row length up to `pad_to_multiple_of`.
    pub fn round(&self, n: usize) -> usize {
        match self.pad_to_multiple_of {
            Some(m) => n.div_ceil(m).saturating_mul(m),
            None => n,
        }
    }
}

/// Token counts of a pair after truncation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// First kept prompt token.
    pub prompt_start: usize,
    pub prompt: usize,
    pub chosen: usize,
    pub rejected: usize,
    /// Whether anything was cut.
    pub truncated: bool,
}

/// Truncate a pair of `p` + `c` / `p` + `r` tokens; `None` when a completion keeps no token.
///
/// The prompt is first cut to `max_prompt_length` (keeping its end or start), then each
/// completion is cut at its end so that `prompt + completion <= max_length`.
pub fn cut(p: usize, c: usize, r: usize, o: &CollateOptions) -> Option<Cut> {
    let mut keep = p;
    if let Some(mp) = o.max_prompt_length {
        keep = keep.min(mp);
    }
    let prompt_start = match o.truncation {
        Truncation::KeepEnd => p - keep,
        Truncation::KeepStart => 0,
    };
    let room = o.max_length.map_or(usize::MAX, |m| m.saturating_sub(keep));
    let (cc, rr) = (c.min(room), r.min(room));
    if cc == 0 || rr == 0 {
        return None;
    }
    Some(Cut {
        prompt_start,
        prompt: keep,
        chosen: cc,
        rejected: rr,
        truncated: keep < p || cc < c || rr < r,
    })
}

/// Rows, row length and real tokens of a collated batch, without building it.
pub fn batch_shape(cuts: &[Cut], o: &CollateOptions) -> (usize, usize, usize) {
    let seqs: Vec<usize> = sequence_lengths(cuts);
    let real: usize = match o.layout {
        Layout::PrefixShared => cuts.iter().map(|c| c.prompt + c.chosen + c.rejected).sum(),
        _ => seqs.iter().sum(),
    };
    let (rows, longest) = match o.layout {
        Layout::Padded => (seqs.len(), seqs.iter().copied().max().unwrap_or(0)),
        Layout::PrefixShared => (
            cuts.len(),
            cuts.iter()
                .map(|c| c.prompt + c.chosen + c.rejected)
                .max()
                .unwrap_or(0),
        ),
        Layout::Packed => {
            let fills = pack(&seqs, o.pack_length).1;
            (fills.len(), fills.iter().copied().max().unwrap_or(0))
        }
    };
    (rows, o.round(longest), real)
}

/// `(2B,)` lengths of the sequences `p c` (first B) and `p r`.
fn sequence_lengths(cuts: &[Cut]) -> Vec<usize> {
    cuts.iter()
        .map(|c| c.prompt + c.chosen)
        .chain(cuts.iter().map(|c| c.prompt + c.rejected))
        .collect()
}

/// First-fit-decreasing placement of sequences into rows of `capacity` tokens (`None`: one row).
/// Returns each sequence's `(row, start)` and each row's fill.
pub fn pack(lengths: &[usize], capacity: Option<usize>) -> (Vec<(usize, usize)>, Vec<usize>) {
    let mut place = vec![(0, 0); lengths.len()];
    let mut fills: Vec<usize> = Vec::new();
    let Some(cap) = capacity else {
        let mut fill = 0;
        for (p, &n) in place.iter_mut().zip(lengths) {
            *p = (0, fill);
            fill += n;
        }
        return (
            place,
            if lengths.is_empty() {
                vec![]
            } else {
                vec![fill]
            },
        );
    };
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&s| std::cmp::Reverse(lengths[s]));
    for s in order {
        let n = lengths[s];
        let row = match fills.iter().position(|&f| f + n <= cap) {
            Some(r) => r,
            None => {
                fills.push(0);
                fills.len() - 1
            }
        };
        place[s] = (row, fills[row]);
        fills[row] += n;
    }
    // Within a row, keep sequences in batch order (chosen first) for readability.
    let mut by_row: Vec<Vec<usize>> = vec![Vec::new(); fills.len()];
    for (s, &(r, _)) in place.iter().enumerate() {
        by_row[r].push(s);
    }
    for seqs in by_row {
        let mut start = 0;
        for s in seqs {
            place[s].1 = start;
            start += lengths[s];
        }
    }
    (place, fills)
}

/// A collated batch of `B` kept pairs; matrices are `(rows, length)` row-major.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Collated {
    pub rows: usize,
    pub length: usize,
    pub input_ids: Vec<i64>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<i64>,
    pub position_ids: Vec<i64>,
    /// True on completion tokens.
    pub loss_mask: Vec<bool>,
    /// Sequence of each token (padded/packed: `side * B + pair`; prefix_shared: pair); -1 on padding.
    pub sequence_ids: Vec<i32>,
    /// packed: boundaries of the sequences (and of each row's trailing padding) in the flattened
    /// `rows * length` token stream; empty for other layouts.
    pub cu_seqlens: Vec<i32>,
    /// prefix_shared: `(B, 3)` ends of prompt, chosen and rejected within the row.
    pub segment_ends: Vec<i64>,
    /// packed and prefix_shared: `(S, 5)` attention segments (see [`crate::core::attn`]).
    pub attn_segments: Vec<i32>,
    /// `(B,)` store index of each kept pair.
    pub pair_index: Vec<i64>,
    /// Store indices of pairs dropped because a completion kept no token.
    pub skipped: Vec<i64>,
    /// Number of kept pairs that were truncated.
    pub truncated: usize,
    pub prompt_lengths: Vec<i64>,
    pub chosen_lengths: Vec<i64>,
    pub rejected_lengths: Vec<i64>,
    pub plan_row: Vec<i64>,
    pub plan_position: Vec<i64>,
    pub plan_target: Vec<i64>,
    pub plan_pair: Vec<i64>,
    pub plan_side: Vec<i64>,
}

type Cells<'b, T> = &'b mut [MaybeUninit<T>];

fn put<T: Copy>(dst: &mut [MaybeUninit<T>], v: T) {
    for d in dst {
        d.write(v);
    }
}

/// Split `v` into consecutive mutable pieces of the given lengths.
fn split_lens<'a, T>(mut v: &'a mut [T], lens: &[usize]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(lens.len());
    for &n in lens {
        let (head, tail) = std::mem::take(&mut v).split_at_mut(n);
        out.push(head);
        v = tail;
    }
    out
}

/// One sequence placed in a row: tokens `prompt` then `completion` starting at `start`, whose
/// positions start at `pos0`; with `shared`, the prompt is already in the row and only the
/// completion is written (prefix_shared rejected side), predicted first from `first_pred`.
#[derive(Clone, Copy)]
struct Piece<'a> {
    pair: usize,
    side: usize,
    prompt: Ints<'a>,
    completion: Ints<'a>,
    start: usize,
    seq_id: i32,
    shared_prompt_end: Option<usize>,
}

/// The prompt, chosen and rejected runs of a pair after truncation.
fn slices<'a>((p, c): &(PairRef<'a>, Cut)) -> (Ints<'a>, Ints<'a>, Ints<'a>) {
    (
        p.prompt.slice(c.prompt_start, c.prompt_start + c.prompt),
        p.chosen.slice(0, c.chosen),
        p.rejected.slice(0, c.rejected),
    )
}

/// Collate already checked pairs (see `PairColumns::pairs`) with options `o`.
pub fn collate(pairs: &[PairRef<'_>], o: &CollateOptions) -> Result<Collated> {
    o.validate()?;
    let mut kept: Vec<(PairRef<'_>, Cut)> = Vec::with_capacity(pairs.len());
    let mut skipped = Vec::new();
    for p in pairs {
        match cut(p.prompt.len(), p.chosen.len(), p.rejected.len(), o) {
            Some(c) => kept.push((*p, c)),
            None => skipped.push(p.index as i64),
        }
    }
    let b = kept.len();
    let cuts: Vec<Cut> = kept.iter().map(|k| k.1).collect();
    if let (Layout::Packed, Some(cap)) = (o.layout, o.pack_length) {
        for (p, c) in &kept {
            let n = c.prompt + c.chosen.max(c.rejected);
            if n > cap {
                return Err(RloxError::value(
                    "pack_length",
                    format!(
                        "pair {} has a sequence of {n} tokens, more than pack_length={cap}; \
                         set max_length <= pack_length",
                        p.index
                    ),
                ));
            }
        }
    }
    let mut row_pieces: Vec<Vec<Piece<'_>>>;
    match o.layout {
        Layout::Padded | Layout::Packed => {
            let (place, rows) = match o.layout {
                Layout::Padded => ((0..2 * b).map(|s| (s, 0)).collect(), 2 * b),
                _ => {
                    let (place, fills) = pack(&sequence_lengths(&cuts), o.pack_length);
                    (place, fills.len())
                }
            };
            row_pieces = vec![Vec::new(); rows];
            for (s, &(row, start)) in place.iter().enumerate() {
                let (pair, side) = (s % b, s / b);
                let (pr, ch, rj) = slices(&kept[pair]);
                row_pieces[row].push(Piece {
                    pair,
                    side,
                    prompt: pr,
                    completion: if side == 0 { ch } else { rj },
                    start,
                    seq_id: s as i32,
                    shared_prompt_end: None,
                });
            }
        }
        Layout::PrefixShared => {
            row_pieces = vec![Vec::new(); b];
            for (pair, k) in kept.iter().enumerate() {
                let (pr, ch, rj) = slices(k);
                let base = Piece {
                    pair,
                    side: 0,
                    prompt: pr,
                    completion: ch,
                    start: 0,
                    seq_id: pair as i32,
                    shared_prompt_end: None,
                };
                row_pieces[pair].push(base);
                row_pieces[pair].push(Piece {
                    side: 1,
                    completion: rj,
                    start: pr.len() + ch.len(),
                    shared_prompt_end: Some(pr.len()),
                    ..base
                });
            }
        }
    }
    // Pairs sit at random places of a large store: start every cache miss now, all at once,
    // instead of one at a time as the fill loop reaches each segment.
    for (p, c) in &kept {
        let (pr, ch, rj) = slices(&(*p, *c));
        pr.prefetch();
        ch.prefetch();
        rj.prefetch();
    }
    let rows = row_pieces.len();
    let fill = |p: &Piece<'_>| {
        let prompt = if p.shared_prompt_end.is_some() {
            0
        } else {
            p.prompt.len()
        };
        p.start + prompt + p.completion.len()
    };
    let longest = row_pieces
        .iter()
        .flat_map(|ps| ps.iter().map(fill))
        .max()
        .unwrap_or(0);
    let length = o.round(longest);
    // Plan entries in row order, sequences in row order, tokens in order.
    let plan_lens: Vec<usize> = row_pieces
        .iter()
        .map(|ps| ps.iter().map(|p| p.completion.len()).sum())
        .collect();
    let total: usize = plan_lens.iter().sum();

    let cells = rows.saturating_mul(length);
    if cells > MAX_CELLS {
        let field = if o.pad_to_multiple_of.is_some_and(|m| m > 1) {
            "pad_to_multiple_of"
        } else {
            "indices"
        };
        return Err(RloxError::value(
            field,
            format!("the batch would hold {rows} x {length} cells, more than {MAX_CELLS}"),
        ));
    }
    // Every output cell is written exactly once below: the pieces of a row cover `0..fill`
    // contiguously and the tail `fill..length` is padding; each plan entry belongs to one token.
    let (mut ids_v, mut att_v, mut pos_v) = (
        Vec::<i64>::with_capacity(cells),
        Vec::<i64>::with_capacity(cells),
        Vec::<i64>::with_capacity(cells),
    );
    let mut lm_v = Vec::<bool>::with_capacity(cells);
    let mut sid_v = Vec::<i32>::with_capacity(cells);
    let mut plan_v: [Vec<i64>; 5] = std::array::from_fn(|_| Vec::with_capacity(total));
    let width = length.max(1);
    {
        let [pr, pp, pt, pa, ps] = &mut plan_v;
        let plan = (
            split_lens(&mut pr.spare_capacity_mut()[..total], &plan_lens),
            split_lens(&mut pp.spare_capacity_mut()[..total], &plan_lens),
            split_lens(&mut pt.spare_capacity_mut()[..total], &plan_lens),
            split_lens(&mut pa.spare_capacity_mut()[..total], &plan_lens),
            split_lens(&mut ps.spare_capacity_mut()[..total], &plan_lens),
        );
        let pad = o.pad_token_id;
        let fill_row = |row: usize,
                        ids: Cells<'_, i64>,
                        att: Cells<'_, i64>,
                        pos: Cells<'_, i64>,
                        lm: Cells<'_, bool>,
                        sid: Cells<'_, i32>,
                        plan_row: [Cells<'_, i64>; 5]| {
            let [p_row, p_pos, p_tgt, p_pair, p_side] = plan_row;
            let mut k = 0;
            let mut fill = 0;
            for pc in &row_pieces[row] {
                let (np, nc) = (pc.prompt.len(), pc.completion.len());
                let first = pc.start;
                let (comp_at, pos0) = match pc.shared_prompt_end {
                    None => {
                        pc.prompt.write_to(&mut ids[first..first + np]);
                        put(&mut lm[first..first + np], false);
                        (first + np, 0)
                    }
                    Some(_) => (first, np),
                };
                let end = comp_at + nc;
                fill = fill.max(end);
                pc.completion.write_to(&mut ids[comp_at..end]);
                put(&mut lm[comp_at..end], true);
                put(&mut att[first..end], 1);
                put(&mut sid[first..end], pc.seq_id);
                for (j, x) in pos[first..end].iter_mut().enumerate() {
                    x.write((pos0 + j) as i64);
                }
                // Token t of the completion is predicted at comp_at + t - 1, except that the
                // first rejected token of a shared prompt is predicted at the prompt's end.
                let plan = k..k + nc;
                put(&mut p_row[plan.clone()], row as i64);
                put(&mut p_pair[plan.clone()], pc.pair as i64);
                put(&mut p_side[plan.clone()], pc.side as i64);
                pc.completion.write_to(&mut p_tgt[plan.clone()]);
                for (j, x) in p_pos[plan].iter_mut().enumerate() {
                    x.write((comp_at + j) as i64 - 1);
                }
                if let (Some(pe), true) = (pc.shared_prompt_end, nc > 0) {
                    p_pos[k].write(pe as i64 - 1);
                }
                k += nc;
            }
            debug_assert_eq!(k, p_row.len());
            put(&mut ids[fill..], pad);
            put(&mut att[fill..], 0);
            put(&mut pos[fill..], 0);
            put(&mut lm[fill..], false);
            put(&mut sid[fill..], -1);
        };
        let (ids_s, att_s, pos_s) = (
            &mut ids_v.spare_capacity_mut()[..cells],
            &mut att_v.spare_capacity_mut()[..cells],
            &mut pos_v.spare_capacity_mut()[..cells],
        );
        let (lm_s, sid_s) = (
            &mut lm_v.spare_capacity_mut()[..cells],
            &mut sid_v.spare_capacity_mut()[..cells],
        );
        if cells >= PARALLEL_CELLS {
            ids_s
                .par_chunks_mut(width)
                .zip(att_s.par_chunks_mut(width))
                .zip(pos_s.par_chunks_mut(width))
                .zip(lm_s.par_chunks_mut(width))
                .zip(sid_s.par_chunks_mut(width))
                .zip(plan.0.into_par_iter())
                .zip(plan.1.into_par_iter())
                .zip(plan.2.into_par_iter())
                .zip(plan.3.into_par_iter())
                .zip(plan.4.into_par_iter())
                .enumerate()
                .for_each(
                    |(row, (((((((((ids, att), pos), lm), sid), a), b), c), d), e))| {
                        fill_row(row, ids, att, pos, lm, sid, [a, b, c, d, e])
                    },
                );
        } else {
            // Small batches: waking the thread pool costs more than it saves.
            ids_s
                .chunks_mut(width)
                .zip(att_s.chunks_mut(width))
                .zip(pos_s.chunks_mut(width))
                .zip(lm_s.chunks_mut(width))
                .zip(sid_s.chunks_mut(width))
                .zip(plan.0)
                .zip(plan.1)
                .zip(plan.2)
                .zip(plan.3)
                .zip(plan.4)
                .enumerate()
                .for_each(
                    |(row, (((((((((ids, att), pos), lm), sid), a), b), c), d), e))| {
                        fill_row(row, ids, att, pos, lm, sid, [a, b, c, d, e])
                    },
                );
        }
    }
    // SAFETY: the loop above initialised all `cells` elements of each matrix (rows are disjoint
    // chunks, each written over `0..length`) and all `total` plan entries (one per token).
    unsafe {
        ids_v.set_len(cells);
        att_v.set_len(cells);
        pos_v.set_len(cells);
        lm_v.set_len(cells);
        sid_v.set_len(cells);
        for v in &mut plan_v {
            v.set_len(total);
        }
    }
    let [plan_row, plan_position, plan_target, plan_pair, plan_side] = plan_v;
    let mut out = Collated {
        rows,
        length,
        input_ids: ids_v,
        attention_mask: att_v,
        position_ids: pos_v,
        loss_mask: lm_v,
        sequence_ids: sid_v,
        plan_row,
        plan_position,
        plan_target,
        plan_pair,
        plan_side,
        skipped,
        ..Default::default()
    };
    if o.layout == Layout::Packed {
        let mut cu = vec![0i64];
        for (row, pieces) in row_pieces.iter().enumerate() {
            let mut fill = 0;
            let mut starts: Vec<(usize, usize)> = pieces
                .iter()
                .map(|p| (p.start, p.prompt.len() + p.completion.len()))
                .collect();
            starts.sort_unstable();
            for (s, n) in starts {
                cu.push((row * length + s + n) as i64);
                fill = s + n;
            }
            if fill < length {
                cu.push(((row + 1) * length) as i64);
            }
        }
        if cells > i32::MAX as usize {
            return Err(RloxError::value(
                "pack_length",
                format!("{cells} tokens do not fit the int32 cu_seqlens"),
            ));
        }
        out.cu_seqlens = cu.into_iter().map(|x| x as i32).collect();
        out.attn_segments = attn::packed_segments(&out.cu_seqlens, length, &out.sequence_ids);
    }
    if o.layout == Layout::PrefixShared {
        out.segment_ends = cuts
            .iter()
            .flat_map(|c| {
                let (p, pc) = (c.prompt, c.prompt + c.chosen);
                [p as i64, pc as i64, (pc + c.rejected) as i64]
            })
            .collect();
        out.attn_segments = attn::prefix_shared_segments(&out.segment_ends);
    }
    out.pair_index = kept.iter().map(|k| k.0.index as i64).collect();
    out.truncated = cuts.iter().filter(|c| c.truncated).count();
    out.prompt_lengths = cuts.iter().map(|c| c.prompt as i64).collect();
    out.chosen_lengths = cuts.iter().map(|c| c.chosen as i64).collect();
    out.rejected_lengths = cuts.iter().map(|c| c.rejected as i64).collect();
    Ok(out)
}

/// A dense `rows x cols` matrix of token ids in row-major order.
#[derive(Debug, Clone, Copy)]
pub struct IdMatrix<'a> {
    pub data: &'a [i64],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> IdMatrix<'a> {
    pub fn new(field: &str, data: &'a [i64], rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(RloxError::value(
                field,
                format!("{} ids do not fill a {rows}x{cols} matrix", data.len()),
            ));
        }
        Ok(Self { data, rows, cols })
    }

    fn row(&self, i: usize) -> &'a [i64] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// The span `[start, end)` of `row` left after stripping pads (leading ones only if `leading`).
fn strip(row: &[i64], pad: Option<i64>, leading: bool) -> (usize, usize) {
    let Some(p) = pad else {
        return (0, row.len());
    };
    let end = row.iter().rposition(|&t| t != p).map_or(0, |e| e + 1);
    let start = if leading {
        row[..end].iter().position(|&t| t != p).unwrap_or(end)
    } else {
        0
    };
    (start, end)
}

/// Padded-layout collation of `(B, P)`, `(B, C)`, `(B, R)` id matrices, without truncation.
///
/// With a pad id, pads may sit on either side of a prompt row and at the right end of completion
/// rows; they are removed first, so a pad is never context and never a target.
pub fn collate_pairs(
    prompt: IdMatrix<'_>,
    chosen: IdMatrix<'_>,
    rejected: IdMatrix<'_>,
    pad_token_id: Option<i64>,
    vocab_size: Option<i64>,
) -> Result<Collated> {
    let b = prompt.rows;
    for (name, m) in [("chosen", &chosen), ("rejected", &rejected)] {
        if m.rows != b {
            return Err(RloxError::value(
                name,
                format!("has batch size {} but prompt has {b}", m.rows),
            ));
        }
    }
    if b == 0 {
        return Err(RloxError::value("prompt", "batch is empty"));
    }
    let mut pairs = Vec::with_capacity(b);
    for i in 0..b {
        let mut runs = [Ints::I64(&[]); 3];
        for (k, (name, m)) in [
            ("prompt", &prompt),
            ("chosen", &chosen),
            ("rejected", &rejected),
        ]
        .into_iter()
        .enumerate()
        {
            let (s, e) = strip(m.row(i), pad_token_id, k == 0);
            if e == s {
                let what = if k == 0 {
                    "prompt has no tokens after removing padding; at least one is needed to predict the first completion token"
                } else {
                    "completion is empty after removing padding"
                };
                return Err(RloxError::at(name, i, what));
            }
            runs[k] = Ints::I64(&m.row(i)[s..e]);
            check_ids(name, i, runs[k], vocab_size)?;
        }
        pairs.push(PairRef {
            index: i,
            prompt: runs[0],
            chosen: runs[1],
            rejected: runs[2],
        });
    }
    let o = CollateOptions {
        pad_token_id: pad_token_id.filter(|&p| p >= 0).unwrap_or(0),
        ..CollateOptions::padded()
    };
    collate(&pairs, &o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: i64 = 0;

    fn m(data: &[i64], rows: usize) -> IdMatrix<'_> {
        IdMatrix::new("x", data, rows, data.len() / rows).unwrap()
    }

    fn pair<'a>(i: usize, p: &'a [i64], c: &'a [i64], r: &'a [i64]) -> PairRef<'a> {
        PairRef {
            index: i,
            prompt: Ints::I64(p),
            chosen: Ints::I64(c),
            rejected: Ints::I64(r),
        }
    }

    #[test]
    fn repacks_left_and_right_padded_prompts() {
        let prompt = [PAD, 5, 6, 7, 8, PAD];
        let chosen = [9, 10, 11, 12];
        let rejected = [13, PAD, 14, 15];
        let b = collate_pairs(
            m(&prompt, 2),
            m(&chosen, 2),
            m(&rejected, 2),
            Some(PAD),
            None,
        )
        .unwrap();
        assert_eq!((b.rows, b.length), (4, 4));
        assert_eq!(
            b.input_ids,
            vec![5, 6, 9, 10, 7, 8, 11, 12, 5, 6, 13, PAD, 7, 8, 14, 15]
        );
        assert_eq!(
            b.attention_mask,
            vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]
        );
        let lm: Vec<i64> = b.loss_mask.iter().map(|&x| x as i64).collect();
        assert_eq!(lm, vec![0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0, 1, 1]);
        assert_eq!(
            b.position_ids,
            vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 0, 0, 1, 2, 3]
        );
        assert_eq!(
            (b.chosen_lengths.clone(), b.rejected_lengths.clone()),
            (vec![2, 2], vec![1, 2])
        );
        assert_eq!(b.plan_row, vec![0, 0, 1, 1, 2, 3, 3]);
        assert_eq!(b.plan_position, vec![1, 2, 1, 2, 1, 1, 2]);
        assert_eq!(b.plan_target, vec![9, 10, 11, 12, 13, 14, 15]);
        assert_eq!(b.plan_pair, vec![0, 0, 1, 1, 0, 1, 1]);
        assert_eq!(b.plan_side, vec![0, 0, 0, 0, 1, 1, 1]);
    }

    #[test]
    fn without_pad_id_everything_counts() {
        let b = collate_pairs(m(&[1, 0], 1), m(&[0], 1), m(&[2, 3], 1), None, None).unwrap();
        assert_eq!(b.input_ids, vec![1, 0, 0, 0, 1, 0, 2, 3]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 0, 1, 1, 1, 1]);
        assert_eq!(b.plan_position, vec![1, 1, 2]);
    }

    #[test]
    fn bad_matrix_input_names_field_and_row() {
        let e = collate_pairs(m(&[1, 2], 2), m(&[3], 1), m(&[4, 5], 2), None, None).unwrap_err();
        assert_eq!(e.field, "chosen");
        let e = collate_pairs(
            m(&[1, 2], 2),
            m(&[3, PAD], 2),
            m(&[4, 5], 2),
            Some(PAD),
            None,
        )
        .unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("chosen", Some(1)));
        let e =
            collate_pairs(m(&[1, 2], 2), m(&[3, 3], 2), m(&[4, -5], 2), None, None).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("rejected", Some(1)));
        let e =
            collate_pairs(m(&[1, 2], 2), m(&[3, 9], 2), m(&[4, 5], 2), None, Some(8)).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("chosen", Some(1)));
    }

    #[test]
    fn prefix_shared_positions_and_plan() {
        let (p, c, r) = ([1, 2], [3, 4, 5], [6, 7]);
        let o = CollateOptions {
            layout: Layout::PrefixShared,
            pad_to_multiple_of: Some(4),
            ..CollateOptions::padded()
        };
        let b = collate(&[pair(7, &p, &c, &r)], &o).unwrap();
        assert_eq!((b.rows, b.length), (1, 8));
        assert_eq!(b.input_ids, vec![1, 2, 3, 4, 5, 6, 7, 0]);
        assert_eq!(b.position_ids, vec![0, 1, 2, 3, 4, 2, 3, 0]);
        assert_eq!(b.segment_ends, vec![2, 5, 7]);
        assert_eq!(b.plan_position, vec![1, 2, 3, 1, 5]);
        assert_eq!(b.plan_target, vec![3, 4, 5, 6, 7]);
        assert_eq!(b.plan_side, vec![0, 0, 0, 1, 1]);
        assert_eq!(b.sequence_ids, vec![0, 0, 0, 0, 0, 0, 0, -1]);
        assert_eq!(b.pair_index, vec![7]);
    }

    #[test]
    fn packed_rows_restart_positions() {
        let (p, c, r) = ([1, 2], [3, 4, 5], [6]);
        let o = CollateOptions {
            layout: Layout::Packed,
            max_length: Some(5),
            pack_length: Some(6),
            ..CollateOptions::padded()
        };
        let b = collate(&[pair(0, &p, &c, &r), pair(1, &p, &r, &r)], &o).unwrap();
        // Sequences of 5, 3, 3, 3 tokens: rows [5], [3, 3], [3].
        assert_eq!((b.rows, b.length), (3, 6));
        assert_eq!(&b.position_ids[6..12], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(b.cu_seqlens, vec![0, 5, 6, 9, 12, 15, 18]);
        assert_eq!(b.plan_row.len(), 3 + 1 + 1 + 1);
        let (nreal, _) = (b.attention_mask.iter().sum::<i64>(), 0);
        assert_eq!(nreal, 14);
    }

    #[test]
    fn truncation_keeps_chosen_end_and_skips_empty() {
        let o = CollateOptions {
            max_length: Some(4),
            max_prompt_length: Some(2),
            ..CollateOptions::padded()
        };
        assert_eq!(
            cut(5, 3, 1, &o),
            Some(Cut {
                prompt_start: 3,
                prompt: 2,
                chosen: 2,
                rejected: 1,
                truncated: true
            })
        );
        let keep_start = CollateOptions {
            truncation: Truncation::KeepStart,
            ..o
        };
        assert_eq!(cut(5, 3, 1, &keep_start).unwrap().prompt_start, 0);
        let no_room = CollateOptions {
            max_length: Some(4),
            ..CollateOptions::padded()
        };
        assert_eq!(cut(4, 3, 1, &no_room), None);
        let (p, c) = ([1, 2, 3, 4], [5]);
        let b = collate(&[pair(3, &p, &c, &c), pair(4, &p[..1], &c, &c)], &no_room).unwrap();
        assert_eq!(
            (b.skipped.clone(), b.pair_index.clone()),
            (vec![3], vec![4])
        );
    }
}
