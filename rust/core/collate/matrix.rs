//! Collation of `(B, T)` id matrices (padded layout), with pads stripped first.

use super::{collate, CollateOptions, Collated};
use crate::core::errors::{Result, RloxError};
use crate::core::store::{check_ids, Ints, PairRef};

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
}
