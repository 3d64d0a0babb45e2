//! Collation of preference pairs into model-ready rows in three layouts, with one gather plan.
//!
//! For a pair with prompt `p` (P tokens), chosen `c` (C) and rejected `r` (R):
//! - `padded`: row `j` is `p c`, row `B + j` is `p r`, right-padded to the longest row.
//! - `packed`: the 2B sequences `p c` and `p r` are placed first-fit-decreasing into rows of at
//!   most `pack_length` tokens (one row when unset); positions restart at 0 in every sequence and
//!   padding only ever sits at the end of a row.
//! - `prefix_shared`: row `j` is `p c r`; positions run `0..P+C` then `P..P+R`, so `r` takes the
//!   positions `c` takes, and `r` must attend to `p` and to itself only (see `segment_ends`).
//!   With `pack_length`, several `p c r` triples are placed first-fit-decreasing into rows of at
//!   most `pack_length` tokens, positions restarting in each triple.
//!
//! The gather plan lists every completion token once: the row and position whose logits predict
//! it, its id, its pair and its side (0 chosen, 1 rejected). Summing log-softmax at those points by
//! (side, pair) gives the same sequence log-probs in every layout.

mod fill;
mod matrix;
mod options;

pub use matrix::{collate_pairs, IdMatrix};
pub use options::{cut, CollateOptions, Cut, Layout, Truncation};

use super::attn;
use super::errors::{Result, RloxError};
use super::store::{Ints, PairRef};

/// Batches of at least this many cells are filled by the thread pool.
pub const PARALLEL_CELLS: usize = 1 << 20;

/// Largest batch, in cells (`rows * length`), that collation builds.
pub const MAX_CELLS: usize = 1 << 32;

/// Rows, row length and real tokens of a collated batch, without building it.
pub fn batch_shape(cuts: &[Cut], o: &CollateOptions) -> (usize, usize, usize) {
    let units: Vec<usize> = match o.layout {
        Layout::PrefixShared => cuts.iter().map(Cut::total).collect(),
        _ => sequence_lengths(cuts),
    };
    let real = units.iter().sum();
    let (rows, longest) = if o.packs_rows() {
        let fills = pack(&units, o.pack_length).1;
        (fills.len(), fills.iter().copied().max().unwrap_or(0))
    } else {
        (units.len(), units.iter().copied().max().unwrap_or(0))
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
    /// prefix_shared: `(B, 3)` ends of prompt, chosen and rejected within the pair's row.
    pub segment_ends: Vec<i64>,
    /// prefix_shared: `(B,)` the row holding each pair.
    pub pair_rows: Vec<i64>,
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

/// Sequence lengths a row holds per placed unit: `p c` and `p r` (packed), or `p c r`
/// (prefix_shared), each checked against `pack_length`.
fn unit_lengths(kept: &[(PairRef<'_>, Cut)], o: &CollateOptions) -> Result<Vec<usize>> {
    let triples = o.layout == Layout::PrefixShared;
    let cuts: Vec<Cut> = kept.iter().map(|k| k.1).collect();
    let lengths = if triples {
        cuts.iter().map(Cut::total).collect()
    } else {
        sequence_lengths(&cuts)
    };
    if let Some(cap) = o.pack_length {
        let b = kept.len();
        if let Some(u) = lengths.iter().position(|&n| n > cap) {
            let (what, hint) = if triples {
                (
                    "prompt + chosen + rejected",
                    "pack_length >= 2 * max_length",
                )
            } else {
                ("a sequence", "max_length <= pack_length")
            };
            return Err(RloxError::value(
                "pack_length",
                format!(
                    "pair {} has {what} of {} tokens, more than pack_length={cap}; set {hint}",
                    kept[u % b].0.index,
                    lengths[u]
                ),
            ));
        }
    }
    Ok(lengths)
}

/// The pieces of every row: where each kept pair's sequences go in the layout of `o`.
fn place<'a>(kept: &[(PairRef<'a>, Cut)], o: &CollateOptions) -> Result<Vec<Vec<Piece<'a>>>> {
    let b = kept.len();
    if o.layout == Layout::Padded {
        return Ok((0..2 * b)
            .map(|s| vec![sequence_piece(kept, s, 0)])
            .collect());
    }
    let lengths = unit_lengths(kept, o)?;
    let (place, fills) = match (o.layout, o.pack_length) {
        // One pair per row unless pack_length asks for several.
        (Layout::PrefixShared, None) => ((0..b).map(|j| (j, 0)).collect(), vec![0; b]),
        _ => pack(&lengths, o.pack_length),
    };
    let mut rows: Vec<Vec<Piece<'a>>> = vec![Vec::new(); fills.len()];
    for (u, &(row, start)) in place.iter().enumerate() {
        if o.layout == Layout::Packed {
            rows[row].push(sequence_piece(kept, u, start));
            continue;
        }
        let (pr, ch, rj) = slices(&kept[u]);
        let chosen = Piece {
            pair: u,
            side: 0,
            prompt: pr,
            completion: ch,
            start,
            seq_id: u as i32,
            shared_prompt_end: None,
        };
        rows[row].push(chosen);
        rows[row].push(Piece {
            side: 1,
            completion: rj,
            start: start + pr.len() + ch.len(),
            shared_prompt_end: Some(start + pr.len()),
            ..chosen
        });
    }
    Ok(rows)
}

/// Sequence `s` of the `2B` (`p c` for `s < B`, else `p r`) as a piece starting at `start`.
fn sequence_piece<'a>(kept: &[(PairRef<'a>, Cut)], s: usize, start: usize) -> Piece<'a> {
    let b = kept.len();
    let (pair, side) = (s % b, s / b);
    let (pr, ch, rj) = slices(&kept[pair]);
    Piece {
        pair,
        side,
        prompt: pr,
        completion: if side == 0 { ch } else { rj },
        start,
        seq_id: s as i32,
        shared_prompt_end: None,
    }
}

/// Boundaries of the packed sequences (and of each row's trailing padding) in the flattened
/// `rows * length` stream.
fn cu_seqlens(row_pieces: &[Vec<Piece<'_>>], length: usize) -> Vec<i32> {
    let mut cu = vec![0i32];
    for (row, pieces) in row_pieces.iter().enumerate() {
        let mut fill = 0;
        let mut starts: Vec<(usize, usize)> = pieces
            .iter()
            .map(|p| (p.start, p.prompt.len() + p.completion.len()))
            .collect();
        starts.sort_unstable();
        for (s, n) in starts {
            cu.push((row * length + s + n) as i32);
            fill = s + n;
        }
        if fill < length {
            cu.push(((row + 1) * length) as i32);
        }
    }
    cu
}

/// `segment_ends`, `pair_rows` and `attn_segments` of prefix-shared rows (pieces come in
/// chosen/rejected pairs, in row order).
fn prefix_shared_structure(out: &mut Collated, row_pieces: &[Vec<Piece<'_>>]) {
    let pairs = row_pieces.iter().map(|r| r.len() / 2).sum::<usize>();
    out.segment_ends = vec![0; 3 * pairs];
    out.pair_rows = vec![0; pairs];
    let mut triples = Vec::with_capacity(pairs);
    for (row, pieces) in row_pieces.iter().enumerate() {
        for two in pieces.chunks_exact(2) {
            let (c, r) = (&two[0], &two[1]);
            let (s, np) = (c.start, c.prompt.len());
            let (nc, nr) = (c.completion.len(), r.completion.len());
            out.segment_ends[3 * c.pair..3 * c.pair + 3]
                .copy_from_slice(&[s + np, s + np + nc, s + np + nc + nr].map(|x| x as i64));
            out.pair_rows[c.pair] = row as i64;
            triples.push(attn::Triple {
                row,
                start: s,
                prompt: np,
                chosen: nc,
                rejected: nr,
            });
        }
    }
    out.attn_segments = attn::prefix_shared_segments(&triples);
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
    let cuts: Vec<Cut> = kept.iter().map(|k| k.1).collect();
    let row_pieces = place(&kept, o)?;
    // Pairs sit at random places of a large store: start every cache miss now, all at once,
    // instead of one at a time as the fill loop reaches each segment.
    for (p, c) in &kept {
        let (pr, ch, rj) = slices(&(*p, *c));
        pr.prefetch();
        ch.prefetch();
        rj.prefetch();
    }
    let rows = row_pieces.len();
    let row_end = |p: &Piece<'_>| {
        let prompt = if p.shared_prompt_end.is_some() {
            0
        } else {
            p.prompt.len()
        };
        p.start + prompt + p.completion.len()
    };
    let longest = row_pieces
        .iter()
        .flat_map(|ps| ps.iter().map(row_end))
        .max()
        .unwrap_or(0);
    let length = o.round(longest);
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
    let filled = fill::fill(&row_pieces, length, o.pad_token_id);
    let [plan_row, plan_position, plan_target, plan_pair, plan_side] = filled.plan;
    let mut out = Collated {
        rows,
        length,
        input_ids: filled.input_ids,
        attention_mask: filled.attention_mask,
        position_ids: filled.position_ids,
        loss_mask: filled.loss_mask,
        sequence_ids: filled.sequence_ids,
        plan_row,
        plan_position,
        plan_target,
        plan_pair,
        plan_side,
        skipped,
        ..Default::default()
    };
    match o.layout {
        Layout::Packed => {
            if cells > i32::MAX as usize {
                return Err(RloxError::value(
                    "pack_length",
                    format!("{cells} tokens do not fit the int32 cu_seqlens"),
                ));
            }
            out.cu_seqlens = cu_seqlens(&row_pieces, length);
            out.attn_segments = attn::packed_segments(&out.cu_seqlens, length, &out.sequence_ids);
        }
        Layout::PrefixShared => prefix_shared_structure(&mut out, &row_pieces),
        Layout::Padded => {}
    }
    out.pair_index = kept.iter().map(|k| k.0.index as i64).collect();
    out.truncated = cuts.iter().filter(|c| c.truncated).count();
    out.prompt_lengths = cuts.iter().map(|c| c.prompt as i64).collect();
    out.chosen_lengths = cuts.iter().map(|c| c.chosen as i64).collect();
    out.rejected_lengths = cuts.iter().map(|c| c.rejected as i64).collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair<'a>(i: usize, p: &'a [i64], c: &'a [i64], r: &'a [i64]) -> PairRef<'a> {
        PairRef {
            index: i,
            prompt: Ints::I64(p),
            chosen: Ints::I64(c),
            rejected: Ints::I64(r),
        }
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
    fn prefix_shared_packs_several_pairs_per_row() {
        let (p, c, r) = ([1, 2], [3, 4, 5], [6, 7]);
        let o = CollateOptions {
            layout: Layout::PrefixShared,
            pack_length: Some(12),
            ..CollateOptions::padded()
        };
        // Triples of 7, 3 and 4 tokens: rows [7 + 4] (pairs 0, 2) and [3] (pair 1).
        let pairs = [
            pair(0, &p, &c, &r),
            pair(1, &p[..1], &c[..1], &r[..1]),
            pair(2, &p[..1], &c[..2], &r[..1]),
        ];
        let b = collate(&pairs, &o).unwrap();
        assert_eq!((b.rows, b.length), (2, 11));
        assert_eq!(&b.input_ids[..11], &[1, 2, 3, 4, 5, 6, 7, 1, 3, 4, 6]);
        assert_eq!(&b.position_ids[..11], &[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1]);
        assert_eq!(b.segment_ends, vec![2, 5, 7, 1, 2, 3, 8, 10, 11]);
        assert_eq!(b.pair_rows, vec![0, 1, 0]);
        assert_eq!(&b.sequence_ids[..11], &[0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2]);
        // Pair 2's first rejected token is predicted at its own prompt's end (position 7).
        assert_eq!(b.plan_row, vec![0, 0, 0, 0, 0, 0, 0, 0, 1, 1]);
        assert_eq!(b.plan_position, vec![1, 2, 3, 1, 5, 7, 8, 7, 0, 0]);
        assert_eq!(b.plan_pair, vec![0, 0, 0, 0, 0, 2, 2, 2, 1, 1]);
        assert_eq!(
            b.attn_segments,
            vec![
                0, 0, 5, 0, 0, 0, 5, 7, 0, 2, 0, 7, 10, 0, 0, 0, 10, 11, 7, 8, 1, 0, 2, 0, 0, 1, 2,
                3, 0, 1
            ]
        );
        let (rows, length, real) = batch_shape(&cuts_of(&pairs, &o), &o);
        assert_eq!((rows, length, real), (2, 11, 14));
        let small = CollateOptions {
            pack_length: Some(6),
            ..o
        };
        let e = collate(&pairs, &small).unwrap_err();
        assert!(e.field == "pack_length" && e.message.contains("pair 0"));
    }

    fn cuts_of(pairs: &[PairRef<'_>], o: &CollateOptions) -> Vec<Cut> {
        pairs
            .iter()
            .filter_map(|p| cut(p.prompt.len(), p.chosen.len(), p.rejected.len(), o))
            .collect()
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
