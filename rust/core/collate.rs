//! Re-packing of padded (prompt, chosen, rejected) id matrices into one `(2B, L)` batch.
//!
//! Row `i` is `prompt_i + chosen_i`, row `B + i` is `prompt_i + rejected_i`, right-padded. With a
//! pad id, pads may sit on either side of a prompt row and at the right end of completion rows;
//! they are removed before re-packing, so a pad is never context and never a target. The gather
//! plan lists, for every completion token, the `(row, position)` whose logits predict it.

use rayon::prelude::*;

use super::errors::{Result, RloxError};

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

/// A `(2B, L)` batch with masks and the log-prob gather plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PairBatch {
    pub rows: usize,
    pub length: usize,
    /// `(2B, L)` token ids; padding holds `pad_token_id` (or 0 without one or if it is negative).
    pub input_ids: Vec<i64>,
    /// `(2B, L)` 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<i64>,
    /// `(2B, L)` true on completion tokens only.
    pub loss_mask: Vec<bool>,
    /// `(2B, L)` 0..len-1 on real tokens, 0 on padding.
    pub position_ids: Vec<i64>,
    /// `(B,)` token counts after removing padding.
    pub prompt_lengths: Vec<i64>,
    pub chosen_lengths: Vec<i64>,
    pub rejected_lengths: Vec<i64>,
    /// `(N,)` per completion token: row, position of the predicting logits, target id.
    pub plan_row: Vec<i64>,
    pub plan_position: Vec<i64>,
    pub plan_target: Vec<i64>,
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

fn check_ids(field: &str, i: usize, ids: &[i64], vocab_size: Option<i64>) -> Result<()> {
    if let Some(&t) = ids.iter().find(|&&t| t < 0) {
        return Err(RloxError::at(field, i, format!("negative token id {t}")));
    }
    if let Some(v) = vocab_size {
        if let Some(&t) = ids.iter().find(|&&t| t >= v) {
            return Err(RloxError::at(
                field,
                i,
                format!("token id {t} is outside the vocabulary (vocab_size={v})"),
            ));
        }
    }
    Ok(())
}

/// Re-pack B pairs into the `(2B, L)` layout. `L` is the longest `prompt + completion`.
pub fn collate_pairs(
    prompt: IdMatrix<'_>,
    chosen: IdMatrix<'_>,
    rejected: IdMatrix<'_>,
    pad_token_id: Option<i64>,
    vocab_size: Option<i64>,
) -> Result<PairBatch> {
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
    let mut spans = Vec::with_capacity(3 * b);
    for i in 0..b {
        let p = strip(prompt.row(i), pad_token_id, true);
        let c = strip(chosen.row(i), pad_token_id, false);
        let r = strip(rejected.row(i), pad_token_id, false);
        for (name, m, (s, e)) in [
            ("prompt", &prompt, p),
            ("chosen", &chosen, c),
            ("rejected", &rejected, r),
        ] {
            if e == s {
                let what = if name == "prompt" {
                    "prompt has no tokens after removing padding; at least one is needed to predict the first completion token"
                } else {
                    "completion is empty after removing padding"
                };
                return Err(RloxError::at(name, i, what));
            }
            check_ids(name, i, &m.row(i)[s..e], vocab_size)?;
        }
        spans.extend([p, c, r]);
    }
    let seq_len = |i: usize, side: usize| {
        let (ps, pe) = spans[3 * i];
        let (cs, ce) = spans[3 * i + 1 + side];
        (pe - ps) + (ce - cs)
    };
    let length = (0..b)
        .map(|i| seq_len(i, 0).max(seq_len(i, 1)))
        .max()
        .unwrap_or(0);
    let rows = 2 * b;
    // Padding slots hold the pad id when it is a valid id, else 0; they are masked either way.
    let fill = pad_token_id.filter(|&p| p >= 0).unwrap_or(0);
    let mut input_ids = vec![fill; rows * length];
    let mut attention_mask = vec![0i64; rows * length];
    let mut loss_mask = vec![false; rows * length];
    let mut position_ids = vec![0i64; rows * length];

    input_ids
        .par_chunks_mut(length)
        .zip(attention_mask.par_chunks_mut(length))
        .zip(loss_mask.par_chunks_mut(length))
        .zip(position_ids.par_chunks_mut(length))
        .enumerate()
        .for_each(|(row, (((ids, att), lm), pos))| {
            let (i, side) = (row % b, row / b);
            let (ps, pe) = spans[3 * i];
            let (cs, ce) = spans[3 * i + 1 + side];
            let comp = if side == 0 {
                chosen.row(i)
            } else {
                rejected.row(i)
            };
            let p = pe - ps;
            let n = p + (ce - cs);
            ids[..p].copy_from_slice(&prompt.row(i)[ps..pe]);
            ids[p..n].copy_from_slice(&comp[cs..ce]);
            att[..n].fill(1);
            lm[p..n].fill(true);
            for (k, x) in pos[..n].iter_mut().enumerate() {
                *x = k as i64;
            }
        });

    let prompt_lengths: Vec<i64> = (0..b)
        .map(|i| (spans[3 * i].1 - spans[3 * i].0) as i64)
        .collect();
    let comp_len = |side: usize| -> Vec<i64> {
        (0..b)
            .map(|i| {
                let (s, e) = spans[3 * i + 1 + side];
                (e - s) as i64
            })
            .collect()
    };
    let chosen_lengths = comp_len(0);
    let rejected_lengths = comp_len(1);

    let total: usize = chosen_lengths
        .iter()
        .chain(&rejected_lengths)
        .map(|&x| x as usize)
        .sum();
    let mut plan_row = Vec::with_capacity(total);
    let mut plan_position = Vec::with_capacity(total);
    let mut plan_target = Vec::with_capacity(total);
    for row in 0..rows {
        let (i, side) = (row % b, row / b);
        let p = prompt_lengths[i] as usize;
        let c = if side == 0 {
            chosen_lengths[i]
        } else {
            rejected_lengths[i]
        } as usize;
        let base = row * length;
        for k in 0..c {
            plan_row.push(row as i64);
            plan_position.push((p + k - 1) as i64);
            plan_target.push(input_ids[base + p + k]);
        }
    }

    Ok(PairBatch {
        rows,
        length,
        input_ids,
        attention_mask,
        loss_mask,
        position_ids,
        prompt_lengths,
        chosen_lengths,
        rejected_lengths,
        plan_row,
        plan_position,
        plan_target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAD: i64 = 0;

    fn m(data: &[i64], rows: usize) -> IdMatrix<'_> {
        IdMatrix::new("x", data, rows, data.len() / rows).unwrap()
    }

    #[test]
    fn repacks_left_and_right_padded_prompts() {
        // prompt 0 is left-padded, prompt 1 right-padded.
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
    }

    #[test]
    fn without_pad_id_everything_counts() {
        let b = collate_pairs(m(&[1, 0], 1), m(&[0], 1), m(&[2, 3], 1), None, None).unwrap();
        assert_eq!(b.input_ids, vec![1, 0, 0, 0, 1, 0, 2, 3]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 0, 1, 1, 1, 1]);
        assert_eq!(b.plan_position, vec![1, 1, 2]);
    }

    #[test]
    fn bad_input_names_field_and_row() {
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
        let e = collate_pairs(
            m(&[1, PAD], 2),
            m(&[3, 3], 2),
            m(&[4, 5], 2),
            Some(PAD),
            None,
        )
        .unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("prompt", Some(1)));
        let e =
            collate_pairs(m(&[1, 2], 2), m(&[3, 3], 2), m(&[4, -5], 2), None, None).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("rejected", Some(1)));
        let e =
            collate_pairs(m(&[1, 2], 2), m(&[3, 9], 2), m(&[4, 5], 2), None, Some(8)).unwrap_err();
        assert_eq!((e.field.as_str(), e.index), ("chosen", Some(1)));
    }
}
