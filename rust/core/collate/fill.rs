//! Writing placed pieces into the output matrices and the gather plan.
//!
//! Every output cell is written exactly once: the pieces of a row cover `0..fill` contiguously
//! and the tail `fill..length` is padding; each plan entry belongs to one completion token. The
//! buffers are allocated uninitialised and only declared initialised once every row is written.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{Piece, PARALLEL_CELLS};

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

/// The `(rows, length)` matrices and the five plan columns of a batch.
pub(super) struct Filled {
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub position_ids: Vec<i64>,
    pub loss_mask: Vec<bool>,
    pub sequence_ids: Vec<i32>,
    /// Row, position, target id, pair and side of every completion token, in row order.
    pub plan: [Vec<i64>; 5],
}

/// One row's share of every output: its matrix cells and its plan entries.
struct RowOut<'b> {
    ids: Cells<'b, i64>,
    att: Cells<'b, i64>,
    pos: Cells<'b, i64>,
    lm: Cells<'b, bool>,
    sid: Cells<'b, i32>,
    plan: [Cells<'b, i64>; 5],
}

/// Write the pieces of one row, then its padding.
fn fill_row(row: usize, pieces: &[Piece<'_>], out: RowOut<'_>, pad: i64) {
    let RowOut {
        ids,
        att,
        pos,
        lm,
        sid,
        plan,
    } = out;
    let [p_row, p_pos, p_tgt, p_pair, p_side] = plan;
    let mut k = 0;
    let mut fill = 0;
    for pc in pieces {
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
        // Token t of the completion is predicted at comp_at + t - 1, except that the first
        // rejected token of a shared prompt is predicted at the prompt's end.
        let span = k..k + nc;
        put(&mut p_row[span.clone()], row as i64);
        put(&mut p_pair[span.clone()], pc.pair as i64);
        put(&mut p_side[span.clone()], pc.side as i64);
        pc.completion.write_to(&mut p_tgt[span.clone()]);
        for (j, x) in p_pos[span].iter_mut().enumerate() {
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
}

/// Fill `(rows, length)` matrices from the pieces of each row (in parallel for large batches).
pub(super) fn fill(row_pieces: &[Vec<Piece<'_>>], length: usize, pad: i64) -> Filled {
    let rows = row_pieces.len();
    let cells = rows * length;
    let width = length.max(1);
    let plan_lens: Vec<usize> = row_pieces
        .iter()
        .map(|ps| ps.iter().map(|p| p.completion.len()).sum())
        .collect();
    let total: usize = plan_lens.iter().sum();
    let mut ids = Vec::<i64>::with_capacity(cells);
    let mut att = Vec::<i64>::with_capacity(cells);
    let mut pos = Vec::<i64>::with_capacity(cells);
    let mut lm = Vec::<bool>::with_capacity(cells);
    let mut sid = Vec::<i32>::with_capacity(cells);
    let mut plan: [Vec<i64>; 5] = std::array::from_fn(|_| Vec::with_capacity(total));
    {
        let mut plan_rows = plan
            .each_mut()
            .map(|v| split_lens(&mut v.spare_capacity_mut()[..total], &plan_lens).into_iter());
        // Rows of each matrix: `rows` chunks of `width` (none when the batch is empty).
        let ids_r = ids.spare_capacity_mut()[..cells].chunks_mut(width);
        let att_r = att.spare_capacity_mut()[..cells].chunks_mut(width);
        let pos_r = pos.spare_capacity_mut()[..cells].chunks_mut(width);
        let lm_r = lm.spare_capacity_mut()[..cells].chunks_mut(width);
        let sid_r = sid.spare_capacity_mut()[..cells].chunks_mut(width);
        let outs: Vec<RowOut<'_>> = ids_r
            .zip(att_r)
            .zip(pos_r)
            .zip(lm_r)
            .zip(sid_r)
            .map(|((((ids, att), pos), lm), sid)| RowOut {
                ids,
                att,
                pos,
                lm,
                sid,
                plan: plan_rows
                    .each_mut()
                    .map(|r| r.next().expect("one plan slice per row")),
            })
            .collect();
        let write = |(row, out): (usize, RowOut<'_>)| fill_row(row, &row_pieces[row], out, pad);
        if cells >= PARALLEL_CELLS {
            outs.into_par_iter().enumerate().for_each(write);
        } else {
            // Small batches: waking the thread pool costs more than it saves.
            outs.into_iter().enumerate().for_each(write);
        }
    }
    // SAFETY: `fill_row` initialised all `cells` elements of each matrix (rows are disjoint
    // chunks, each written over `0..length`) and all `total` plan entries (one per token).
    unsafe {
        ids.set_len(cells);
        att.set_len(cells);
        pos.set_len(cells);
        lm.set_len(cells);
        sid.set_len(cells);
        for v in &mut plan {
            v.set_len(total);
        }
    }
    Filled {
        input_ids: ids,
        attention_mask: att,
        position_ids: pos,
        loss_mask: lm,
        sequence_ids: sid,
        plan,
    }
}
