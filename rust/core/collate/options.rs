//! Collation options: layouts, prompt truncation, and the token counts a pair keeps.

use crate::core::errors::{Result, RloxError};

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
    /// Token budget of a row of several sequences (packed) or pairs (prefix_shared); `None`:
    /// one row (packed) or one pair per row (prefix_shared).
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

    /// Whether rows are filled first-fit-decreasing up to `pack_length` (a batch's cost is then
    /// its real tokens).
    pub fn packs_rows(&self) -> bool {
        match self.layout {
            Layout::Packed => true,
            Layout::PrefixShared => self.pack_length.is_some(),
            Layout::Padded => false,
        }
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

impl Cut {
    /// Tokens of the prefix-shared sequence `p c r`.
    pub fn total(&self) -> usize {
        self.prompt + self.chosen + self.rejected
    }
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
