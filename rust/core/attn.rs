//! Attention segments of packed and prefix-shared rows, for per-sequence attention kernels.
//!
//! A segment is `[row, q_start, q_end, prefix_start, prefix_end]`: the queries in
//! `[q_start, q_end)` of `row` attend causally to the keys `[q_start, q]` and fully to the keys
//! `[prefix_start, prefix_end)` (empty when the two are equal). Padding is in no segment.

/// Segments of a packed batch: one per sequence, empty prefix. `cu_seqlens` holds the
/// boundaries of the sequences and of each row's trailing padding in the flattened
/// `rows * length` stream; `sequence_ids` is -1 on padding.
pub fn packed_segments(cu_seqlens: &[i32], length: usize, sequence_ids: &[i32]) -> Vec<i32> {
    let mut out = Vec::with_capacity(5 * cu_seqlens.len().saturating_sub(1));
    for w in cu_seqlens.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        if b <= a || sequence_ids.get(a).is_none_or(|&s| s < 0) {
            continue;
        }
        let (row, start) = (a / length, a % length);
        let (s, e) = (start as i32, (start + b - a) as i32);
        out.extend_from_slice(&[row as i32, s, e, 0, 0]);
    }
    out
}

/// One prefix-shared pair `p c r` placed in `row` from `start`, with its token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Triple {
    pub row: usize,
    pub start: usize,
    pub prompt: usize,
    pub chosen: usize,
    pub rejected: usize,
}

/// Segments of prefix-shared rows: per pair, `p c` causally, then `r` over `p` and itself.
pub fn prefix_shared_segments(triples: &[Triple]) -> Vec<i32> {
    let mut out = Vec::with_capacity(10 * triples.len());
    for t in triples {
        let (row, s) = (t.row as i32, t.start as i32);
        let (p, c) = (s + t.prompt as i32, s + (t.prompt + t.chosen) as i32);
        let r = c + t.rejected as i32;
        out.extend_from_slice(&[row, s, c, 0, 0]);
        if r > c {
            out.extend_from_slice(&[row, c, r, s, p]);
        }
    }
    out
}

use rayon::prelude::*;

use super::errors::{Result, RloxError};

/// Per token of a `(rows, length)` batch: the start of its segment and its prefix range.
/// Padding tokens get `(t, t, t)`: they see only themselves.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenSpans {
    pub seg_start: Vec<i32>,
    pub prefix_start: Vec<i32>,
    pub prefix_end: Vec<i32>,
}

/// Checks `segments` (`(S, 5)` flattened) against the batch shape and expands them per token.
pub fn token_spans(segments: &[i32], rows: usize, length: usize) -> Result<TokenSpans> {
    if segments.len() % 5 != 0 {
        return Err(RloxError::value("attn_segments", "must have 5 columns"));
    }
    let n = rows * length;
    let own: Vec<i32> = (0..n).map(|t| (t % length) as i32).collect();
    let mut spans = TokenSpans {
        seg_start: own.clone(),
        prefix_start: own.clone(),
        prefix_end: own,
    };
    let mut covered = vec![false; n];
    for (i, s) in segments.chunks_exact(5).enumerate() {
        let [row, q0, q1, p0, p1] = [s[0], s[1], s[2], s[3], s[4]];
        let inside = |x: i32| x >= 0 && x as usize <= length;
        if row < 0 || row as usize >= rows || !(inside(q0) && inside(q1) && q0 < q1) {
            return Err(RloxError::at(
                "attn_segments",
                i,
                "segment lies outside its row",
            ));
        }
        if !(inside(p0) && inside(p1) && p0 <= p1 && (p0 == p1 || p1 <= q0)) {
            return Err(RloxError::at(
                "attn_segments",
                i,
                "prefix must end before the segment",
            ));
        }
        for q in q0..q1 {
            let t = row as usize * length + q as usize;
            if std::mem::replace(&mut covered[t], true) {
                return Err(RloxError::at(
                    "attn_segments",
                    i,
                    "overlaps another segment",
                ));
            }
            spans.seg_start[t] = q0;
            spans.prefix_start[t] = p0;
            spans.prefix_end[t] = p1;
        }
    }
    Ok(spans)
}

/// Block structure of a FlexAttention `BlockMask` (`BlockMask.from_kv_blocks`): per row and
/// query block, the partial and the fully visible key blocks, each `(rows, q_blocks)` counts
/// and `(rows, q_blocks, kv_blocks)` indices (unused tail entries 0).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FlexBlocks {
    pub q_blocks: usize,
    pub kv_blocks: usize,
    pub kv_num_blocks: Vec<i32>,
    pub kv_indices: Vec<i32>,
    pub full_kv_num_blocks: Vec<i32>,
    pub full_kv_indices: Vec<i32>,
}

/// Keys of `[k0, k1)` that query `q` (at flat token `t`) sees.
fn visible(spans: &TokenSpans, t: usize, q: i32, k0: i32, k1: i32) -> i64 {
    let overlap = |a: i32, b: i32| (b.min(k1) - a.max(k0)).max(0) as i64;
    overlap(spans.seg_start[t], q + 1) + overlap(spans.prefix_start[t], spans.prefix_end[t])
}

/// The [`FlexBlocks`] of a batch's token spans; `q_block`/`kv_block` as FlexAttention's
/// `BLOCK_SIZE` (128 by default).
pub fn flex_blocks(
    spans: &TokenSpans,
    rows: usize,
    length: usize,
    q_block: usize,
    kv_block: usize,
) -> Result<FlexBlocks> {
    if q_block == 0 || kv_block == 0 {
        return Err(RloxError::value("block_size", "must be >= 1"));
    }
    let (qb, kb) = (length.div_ceil(q_block), length.div_ceil(kv_block));
    let mut out = FlexBlocks {
        q_blocks: qb,
        kv_blocks: kb,
        kv_num_blocks: vec![0; rows * qb],
        kv_indices: vec![0; rows * qb * kb],
        full_kv_num_blocks: vec![0; rows * qb],
        full_kv_indices: vec![0; rows * qb * kb],
    };
    let counts = out.kv_num_blocks.par_chunks_mut(1);
    let full_counts = out.full_kv_num_blocks.par_chunks_mut(1);
    let index = out.kv_indices.par_chunks_mut(kb);
    let full_index = out.full_kv_indices.par_chunks_mut(kb);
    counts
        .zip(full_counts)
        .zip(index.zip(full_index))
        .enumerate()
        .for_each(|(cell, ((num, full_num), (idx, full_idx)))| {
            let (row, b) = (cell / qb, cell % qb);
            let (q0, q1) = (b * q_block, ((b + 1) * q_block).min(length));
            for k in 0..kb {
                let (k0, k1) = (k * kv_block, ((k + 1) * kv_block).min(length));
                let seen: i64 = (q0..q1)
                    .map(|q| visible(spans, row * length + q, q as i32, k0 as i32, k1 as i32))
                    .sum();
                if seen == ((q1 - q0) * (k1 - k0)) as i64 {
                    full_idx[full_num[0] as usize] = k as i32;
                    full_num[0] += 1;
                } else if seen > 0 {
                    idx[num[0] as usize] = k as i32;
                    num[0] += 1;
                }
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_skip_padding() {
        // Row 0: sequences of 5 and 1 then 2 padding; row 1: sequences of 3, 3 and 2.
        let cu = [0, 5, 6, 8, 11, 14, 16];
        let mut sid = vec![0, 0, 0, 0, 0, 1, -1, -1];
        sid.extend([2, 2, 2, 3, 3, 3, 4, 4]);
        let got = packed_segments(&cu, 8, &sid);
        let want = vec![
            0, 0, 5, 0, 0, 0, 5, 6, 0, 0, 1, 0, 3, 0, 0, 1, 3, 6, 0, 0, 1, 6, 8, 0, 0,
        ];
        assert_eq!(got, want);
    }

    fn triple(row: usize, start: usize, p: usize, c: usize, r: usize) -> Triple {
        Triple {
            row,
            start,
            prompt: p,
            chosen: c,
            rejected: r,
        }
    }

    #[test]
    fn prefix_shared_rejected_sees_the_prompt() {
        let got = prefix_shared_segments(&[triple(0, 0, 2, 3, 2), triple(1, 0, 1, 1, 2)]);
        assert_eq!(
            got,
            vec![0, 0, 5, 0, 0, 0, 5, 7, 0, 2, 1, 0, 2, 0, 0, 1, 2, 4, 0, 1]
        );
        // A second pair later in row 0: its rejected part sees its own prompt only.
        let got = prefix_shared_segments(&[triple(0, 7, 2, 1, 3)]);
        assert_eq!(got, vec![0, 7, 10, 0, 0, 0, 10, 13, 7, 9]);
    }

    #[test]
    fn blocks_split_full_partial_and_empty() {
        // One row of 8 tokens: a causal segment [0, 4), then [4, 8) over the prefix [0, 2).
        let spans = token_spans(&[0, 0, 4, 0, 0, 0, 4, 8, 0, 2], 1, 8).unwrap();
        let b = flex_blocks(&spans, 1, 8, 2, 2).unwrap();
        assert_eq!((b.q_blocks, b.kv_blocks), (4, 4));
        // Query block 2 (tokens 4, 5): key block 0 full (prefix), 1 empty, 2 partial (causal);
        // block 3 (6, 7) sees blocks 0 and 2 fully and its own partly.
        assert_eq!(b.full_kv_num_blocks, vec![0, 1, 1, 2]);
        assert_eq!(b.kv_num_blocks, vec![1, 1, 1, 1]);
        assert_eq!(
            b.kv_indices,
            vec![0, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]
        );
        assert_eq!(
            &b.full_kv_indices[4..],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0]
        );
    }

    #[test]
    fn bad_segments_name_the_index() {
        let e = token_spans(&[0, 0, 4, 0, 0, 0, 3, 6, 0, 0], 1, 8).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("attn_segments", Some(1)));
        assert!(token_spans(&[1, 0, 4, 0, 0], 1, 8).is_err());
        assert!(token_spans(&[0, 2, 4, 0, 3], 1, 8).is_err());
        let spans = token_spans(&[], 1, 8).unwrap();
        assert!(flex_blocks(&spans, 1, 8, 0, 2).is_err());
    }
}
