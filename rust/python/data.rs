//! `PairStore`: the Rust ragged store behind `rlox.data.PreferenceDataset`.
//!
//! It holds six numpy arrays (numpy, Arrow or memory-mapped memory, never copied when they are
//! int32/int64 and contiguous) and borrows them as slices for each call, with the GIL released.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use numpy::{
    PyArray1, PyArrayDescrMethods, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::convert::{collated_dict, dtype_name, int64_array, int_arg, ndarray, str_arg, vec_i64};
use super::errors::to_py;
use crate::core::collate::{collate, CollateOptions, Layout, Truncation};
#[cfg(unix)]
use crate::core::direct::DirectFiles;
use crate::core::disk;
use crate::core::errors::RloxError;
use crate::core::parts::Parts;
use crate::core::plan::{layout_tokens, plan, Plan, PlanOptions};
use crate::core::prefetch::will_need_offsets;
use crate::core::prune::{deduplicate, filter, FilterOptions, REASONS};
use crate::core::store::{check_pair_ids, Column, Ints, IntsBuf, PairColumns};

const NAMES: [&str; 6] = [
    "prompt_values",
    "prompt_offsets",
    "chosen_values",
    "chosen_offsets",
    "rejected_values",
    "rejected_offsets",
];
type Array<'py> = Bound<'py, PyArray1<i64>>;

const COLUMNS: [&str; 3] = ["prompt", "chosen", "rejected"];

enum Held {
    I32(Py<PyArray1<i32>>),
    I64(Py<PyArray1<i64>>),
}

enum Guard<'py> {
    I32(PyReadonlyArray1<'py, i32>),
    I64(PyReadonlyArray1<'py, i64>),
}

impl Guard<'_> {
    fn ints(&self) -> Ints<'_> {
        match self {
            Guard::I32(a) => Ints::I32(a.as_slice().expect("contiguous")),
            Guard::I64(a) => Ints::I64(a.as_slice().expect("contiguous")),
        }
    }
}

/// A 1-D int32/int64 array (zero-copy); other integer dtypes are converted to int64.
fn hold(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<Held> {
    let arr = ndarray(name, obj, 1)?;
    if let Ok(a) = arr.cast::<PyArray1<i32>>() {
        return Ok(Held::I32(a.clone().unbind()));
    }
    if let Ok(a) = arr.cast::<PyArray1<i64>>() {
        return Ok(Held::I64(a.clone().unbind()));
    }
    let kind = arr.dtype().kind();
    if kind != b'i' && kind != b'u' {
        return Err(to_py(RloxError::type_error(
            name,
            format!("must hold integers, got dtype {}", dtype_name(&arr)),
        )));
    }
    Ok(Held::I64(
        int64_array(name, obj, 1)?
            .cast_into::<PyArray1<i64>>()?
            .unbind(),
    ))
}

/// A non-negative integer option (`None` passes through).
fn count_arg(name: &str, obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    match int_arg(name, obj)? {
        None => Ok(None),
        Some(v) if v < 0 => Err(to_py(RloxError::value(
            name,
            format!("must be >= 0, got {v}"),
        ))),
        Some(v) => Ok(Some(v as usize)),
    }
}

const COLLATE_KEYS: [&str; 7] = [
    "layout",
    "max_length",
    "max_prompt_length",
    "truncation",
    "pad_token_id",
    "pad_to_multiple_of",
    "pack_length",
];
const PLAN_KEYS: [&str; 10] = [
    "batch_size",
    "max_tokens",
    "shuffle",
    "seed",
    "epoch",
    "group_by_length",
    "drop_last",
    "rank",
    "world_size",
    "group_batches",
];

/// The keyword options of one call, read by name; a key outside `allowed` is a `TypeError`.
struct Options<'a, 'py>(Option<&'a Bound<'py, PyDict>>);

impl<'a, 'py> Options<'a, 'py> {
    fn new(dict: Option<&'a Bound<'py, PyDict>>, allowed: &[&str]) -> PyResult<Self> {
        if let Some(d) = dict {
            for key in d.keys() {
                let key: String = key.extract()?;
                if !allowed.contains(&key.as_str()) {
                    return Err(to_py(RloxError::type_error(&key, "unexpected option")));
                }
            }
        }
        Ok(Self(dict))
    }

    fn get(&self, key: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(match self.0 {
            Some(d) => d.get_item(key)?.filter(|v| !v.is_none()),
            None => None,
        })
    }

    fn count(&self, key: &str) -> PyResult<Option<usize>> {
        count_arg(key, self.get(key)?.as_ref())
    }

    fn flag(&self, key: &str, default: bool) -> PyResult<bool> {
        match self.get(key)? {
            None => Ok(default),
            Some(v) => v
                .extract::<bool>()
                .map_err(|_| to_py(RloxError::type_error(key, "expected a bool"))),
        }
    }

    fn text(&self, key: &str, default: &str) -> PyResult<String> {
        // `None` is not a valid layout or truncation mode, so it is not read as "unset".
        let value = match self.0 {
            Some(d) => d.get_item(key)?,
            None => None,
        };
        match value {
            None => Ok(default.to_owned()),
            Some(v) => str_arg(key, &v),
        }
    }

    /// Collation options (layout "padded", truncation "keep_end", everything else unset).
    fn collate(&self) -> PyResult<CollateOptions> {
        let o = CollateOptions {
            layout: Layout::parse(&self.text("layout", "padded")?).map_err(to_py)?,
            max_length: self.count("max_length")?,
            max_prompt_length: self.count("max_prompt_length")?,
            truncation: Truncation::parse(&self.text("truncation", "keep_end")?).map_err(to_py)?,
            pad_token_id: int_arg("pad_token_id", self.get("pad_token_id")?.as_ref())?.unwrap_or(0),
            pad_to_multiple_of: self.count("pad_to_multiple_of")?,
            pack_length: self.count("pack_length")?,
        };
        o.validate().map_err(to_py)?;
        Ok(o)
    }
}

/// Ragged (prompt, chosen, rejected) token columns: flat values plus `n + 1` offsets each, in
/// one or more parts read as one store.
#[pyclass(module = "rlox._rlox", frozen)]
pub struct PairStore {
    /// Six arrays per part, in constructor order.
    parts: Vec<Vec<Held>>,
    len: usize,
    /// Largest token id once `validate` has passed (`UNCHECKED` before): collation then skips
    /// the per-token id checks that this bound already answers.
    max_id: AtomicI64,
    /// Whether scans of all lengths first ask the kernel for the offsets pages (mapped parts).
    prefetch: AtomicBool,
    /// The mapped files, opened for direct reads of each batch's runs (`read_direct`).
    direct: RwLock<Option<Arc<Direct>>>,
}

#[cfg(unix)]
type Direct = DirectFiles;
#[cfg(not(unix))]
type Direct = ();

const UNCHECKED: i64 = i64::MIN;

impl PairStore {
    /// The id checks collation still needs: none when validation bounded every id below the
    /// vocabulary (or no vocabulary is given); else `Some(vocab)`.
    fn id_checks(&self, vocab: Option<i64>) -> Option<Option<i64>> {
        let max = self.max_id.load(Ordering::Relaxed);
        match vocab {
            _ if max == UNCHECKED => Some(vocab),
            Some(v) if max >= v => Some(vocab),
            _ => None,
        }
    }

    fn guards<'py>(&self, py: Python<'py>) -> Vec<Vec<Guard<'py>>> {
        let guard = |h: &Held| match h {
            Held::I32(a) => Guard::I32(a.bind(py).readonly()),
            Held::I64(a) => Guard::I64(a.bind(py).readonly()),
        };
        self.parts
            .iter()
            .map(|p| p.iter().map(guard).collect())
            .collect()
    }

    /// Every pair's lengths; a mapped store first asks for all offsets pages at once.
    fn scan_lengths(&self, cols: &Parts<'_>) -> [Vec<i64>; 3] {
        if self.prefetch.load(Ordering::Relaxed) {
            will_need_offsets(cols);
        }
        cols.lengths()
    }

    fn held_arrays<'py>(py: Python<'py>, part: &[Held]) -> Vec<Bound<'py, PyAny>> {
        part.iter()
            .map(|h| match h {
                Held::I32(a) => a.bind(py).clone().into_any(),
                Held::I64(a) => a.bind(py).clone().into_any(),
            })
            .collect()
    }
}

fn part_columns<'a>(g: &'a [Guard<'_>]) -> Result<PairColumns<'a>, RloxError> {
    let col = |k: usize| Column::new(COLUMNS[k], g[2 * k].ints(), g[2 * k + 1].ints());
    PairColumns::new(col(0)?, col(1)?, col(2)?)
}

fn columns<'a>(g: &'a [Vec<Guard<'_>>]) -> Result<Parts<'a>, RloxError> {
    let parts = g
        .iter()
        .map(|p| part_columns(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parts::new(parts))
}

fn index_array<'py>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadonlyArray1<'py, i64>> {
    Ok(int64_array("indices", obj, 1)?
        .cast_into::<PyArray1<i64>>()?
        .readonly())
}

#[pymethods]
impl PairStore {
    /// Wrap six 1-D integer arrays (int32/int64 kept as they are). Checks are O(1): the first
    /// and last offsets of each column and equal row counts; see :meth:`validate`.
    #[new]
    fn new(
        py: Python<'_>,
        prompt_values: &Bound<'_, PyAny>,
        prompt_offsets: &Bound<'_, PyAny>,
        chosen_values: &Bound<'_, PyAny>,
        chosen_offsets: &Bound<'_, PyAny>,
        rejected_values: &Bound<'_, PyAny>,
        rejected_offsets: &Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        let objs = [
            prompt_values,
            prompt_offsets,
            chosen_values,
            chosen_offsets,
            rejected_values,
            rejected_offsets,
        ];
        let held = objs
            .iter()
            .zip(NAMES)
            .map(|(o, n)| hold(n, o))
            .collect::<PyResult<Vec<_>>>()?;
        let store = Self {
            parts: vec![held],
            len: 0,
            max_id: AtomicI64::new(UNCHECKED),
            prefetch: AtomicBool::new(false),
            direct: RwLock::new(None),
        };
        let len = columns(&store.guards(py)).map_err(to_py)?.len();
        Ok(Self { len, ..store })
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// The stores' parts in order, read as one store (nothing is copied).
    #[staticmethod]
    fn concat(py: Python<'_>, stores: Vec<PyRef<'_, PairStore>>) -> Self {
        let parts = stores
            .iter()
            .flat_map(|s| s.parts.iter())
            .map(|p| {
                p.iter()
                    .map(|h| match h {
                        Held::I32(a) => Held::I32(a.clone_ref(py)),
                        Held::I64(a) => Held::I64(a.clone_ref(py)),
                    })
                    .collect()
            })
            .collect();
        let maxes = stores.iter().map(|s| s.max_id.load(Ordering::Relaxed));
        let max_id = if stores
            .iter()
            .any(|s| s.max_id.load(Ordering::Relaxed) == UNCHECKED)
        {
            UNCHECKED
        } else {
            maxes.max().unwrap_or(-1)
        };
        Self {
            parts,
            len: stores.iter().map(|s| s.len).sum(),
            max_id: AtomicI64::new(max_id),
            prefetch: AtomicBool::new(stores.iter().any(|s| s.prefetch.load(Ordering::Relaxed))),
            direct: RwLock::new(None),
        }
    }

    /// Read each batch's token runs from these files with positioned direct reads instead of
    /// through the memory map: `files` lists `(path, mapped address, mapped length)` of the
    /// mapped parts; `None` switches back to the map.
    fn read_direct(
        &self,
        py: Python<'_>,
        files: Option<Vec<(String, usize, usize)>>,
    ) -> PyResult<()> {
        let opened = match files {
            #[cfg(unix)]
            Some(f) => Some(Arc::new(
                py.detach(|| DirectFiles::open(&f)).map_err(to_py)?,
            )),
            #[cfg(not(unix))]
            Some(_) => {
                let _ = py;
                return Err(to_py(RloxError::value(
                    "access",
                    "direct reads need a Unix system",
                )));
            }
            None => None,
        };
        *self.direct.write().unwrap_or_else(|e| e.into_inner()) = opened;
        Ok(())
    }

    /// Whether collation reads token runs with direct reads (see `read_direct`).
    #[getter]
    fn get_direct(&self) -> bool {
        self.direct
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Whether scans of all lengths (`lengths`, `plan`, `layout_tokens`) first ask the kernel for
    /// every offsets page at once (for memory-mapped stores; a hint only, results are the same).
    #[setter]
    fn set_prefetch(&self, on: bool) {
        self.prefetch.store(on, Ordering::Relaxed);
    }

    #[getter]
    fn get_prefetch(&self) -> bool {
        self.prefetch.load(Ordering::Relaxed)
    }

    /// The six arrays in constructor order (a store of one part).
    fn arrays<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyAny>>> {
        match self.parts.as_slice() {
            [one] => Ok(Self::held_arrays(py, one)),
            many => Err(to_py(RloxError::value(
                "arrays",
                format!(
                    "a store of {} parts has no single set of arrays",
                    many.len()
                ),
            ))),
        }
    }

    /// Each part's six arrays, in order.
    fn parts<'py>(&self, py: Python<'py>) -> Vec<Vec<Bound<'py, PyAny>>> {
        self.parts
            .iter()
            .map(|p| Self::held_arrays(py, p))
            .collect()
    }

    /// `(parts + 1,)` int64: the global index of each part's first pair, then the total.
    fn starts<'py>(&self, py: Python<'py>) -> PyResult<Array<'py>> {
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        Ok(vec_i64(
            py,
            cols.starts().iter().map(|&s| s as i64).collect(),
        ))
    }

    /// Check every pair: offsets, non-empty prompt and completions, ids in `[0, vocab_size)`.
    #[pyo3(signature = (vocab_size=None))]
    fn validate(&self, py: Python<'_>, vocab_size: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let vocab = int_arg("vocab_size", vocab_size)?;
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let max = py.detach(|| cols.validate(vocab)).map_err(to_py)?;
        self.max_id.store(max, Ordering::Relaxed);
        Ok(())
    }

    /// `(n,)` int64 prompt, chosen and rejected lengths.
    fn lengths<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyArray1<i64>>>> {
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let lens = py.detach(|| self.scan_lengths(&cols));
        Ok(lens.into_iter().map(|v| vec_i64(py, v)).collect())
    }

    /// The rows at `indices` as six new compact arrays (constructor order).
    fn take<'py>(
        &self,
        py: Python<'py>,
        indices: &Bound<'py, PyAny>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let idx = index_array(indices)?;
        let idx = idx.as_slice()?;
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let taken = py
            .detach(|| {
                (0..3)
                    .map(|c| cols.take(c, idx))
                    .collect::<Result<Vec<_>, _>>()
            })
            .map_err(to_py)?;
        let mut out = Vec::with_capacity(6);
        for (values, offsets) in taken {
            out.push(match values {
                IntsBuf::I32(v) => PyArray1::from_vec(py, v).into_any(),
                IntsBuf::I64(v) => PyArray1::from_vec(py, v).into_any(),
            });
            out.push(vec_i64(py, offsets).into_any());
        }
        Ok(out)
    }

    /// Collate the pairs at `indices` (see `PreferenceDataset.collate`); a dict of arrays.
    /// Options: layout, max_length, max_prompt_length, truncation, pad_token_id,
    /// pad_to_multiple_of, pack_length.
    #[pyo3(signature = (indices, *, vocab_size=None, **options))]
    fn collate<'py>(
        &self,
        py: Python<'py>,
        indices: &Bound<'py, PyAny>,
        vocab_size: Option<&Bound<'py, PyAny>>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let o = Options::new(options, &COLLATE_KEYS)?.collate()?;
        let vocab = int_arg("vocab_size", vocab_size)?;
        let idx = index_array(indices)?;
        let idx = idx.as_slice()?;
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let direct = self
            .direct
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let batch = py
            .detach(|| {
                #[cfg(unix)]
                if let Some(files) = &direct {
                    // Ids are checked on the copies read, so the map is never touched.
                    let pairs = cols.pairs(idx, None)?;
                    let runs = files.read(&pairs)?;
                    let read = runs.pairs(&pairs);
                    if let Some(vocab) = self.id_checks(vocab) {
                        read.iter().try_for_each(|p| check_pair_ids(p, vocab))?;
                    }
                    return collate(&read, &o);
                }
                let pairs = cols.pairs(idx, self.id_checks(vocab))?;
                #[cfg(not(unix))]
                let _ = direct;
                collate(&pairs, &o)
            })
            .map_err(to_py)?;
        collated_dict(py, batch)
    }

    /// One rank's batches for one epoch: `(indices, offsets)`, batch k is
    /// `indices[offsets[k]:offsets[k + 1]]`. Options: those of `batches`, plus the collation
    /// options that size a batch (layout, max_length, max_prompt_length, truncation,
    /// pad_to_multiple_of, pack_length).
    #[pyo3(signature = (**options))]
    fn plan<'py>(
        &self,
        py: Python<'py>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<(Array<'py>, Array<'py>)> {
        let keys: Vec<&str> = PLAN_KEYS.iter().chain(&COLLATE_KEYS).copied().collect();
        let opts = Options::new(options, &keys)?;
        let o = PlanOptions {
            batch_size: opts.count("batch_size")?,
            max_tokens: opts.count("max_tokens")?,
            shuffle: opts.flag("shuffle", true)?,
            seed: opts.count("seed")?.unwrap_or(0) as u64,
            epoch: opts.count("epoch")?.unwrap_or(0) as u64,
            group_by_length: opts.flag("group_by_length", true)?,
            drop_last: opts.flag("drop_last", false)?,
            rank: opts.count("rank")?.unwrap_or(0),
            world_size: opts.count("world_size")?.unwrap_or(1),
            group_batches: opts.count("group_batches")?.unwrap_or(64),
            collate: opts.collate()?,
        };
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let p = py
            .detach(|| {
                let lens = self.scan_lengths(&cols);
                plan([&lens[0], &lens[1], &lens[2]], &o)
            })
            .map_err(to_py)?;
        Ok((vec_i64(py, p.indices), vec_i64(py, p.offsets)))
    }

    /// `(real_tokens, total_slots)` of collating the batches `(indices, offsets)`; options as
    /// for `collate`.
    #[pyo3(signature = (indices, offsets, **options))]
    fn layout_tokens<'py>(
        &self,
        py: Python<'py>,
        indices: &Bound<'py, PyAny>,
        offsets: &Bound<'py, PyAny>,
        options: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<(u64, u64)> {
        let o = Options::new(options, &COLLATE_KEYS)?.collate()?;
        let idx = index_array(indices)?;
        let off = int64_array("offsets", offsets, 1)?
            .cast_into::<PyArray1<i64>>()?
            .readonly();
        let (idx, off) = (idx.as_slice()?, off.as_slice()?);
        let n = self.len as i64;
        if let Some(k) = idx.iter().position(|&i| i < 0 || i >= n) {
            return Err(to_py(RloxError::at(
                "indices",
                k,
                format!("pair index {} is out of range for {n} pairs", idx[k]),
            )));
        }
        let bad = off.first() != Some(&0)
            || off.last() != Some(&(idx.len() as i64))
            || off.windows(2).any(|w| w[1] < w[0]);
        if bad {
            return Err(to_py(RloxError::value(
                "offsets",
                "must rise from 0 to len(indices)",
            )));
        }
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let p = Plan {
            indices: idx.to_vec(),
            offsets: off.to_vec(),
        };
        py.detach(|| {
            let lens = self.scan_lengths(&cols);
            layout_tokens([&lens[0], &lens[1], &lens[2]], &p, &o)
        })
        .map_err(to_py)
    }

    /// The pairs passing the length bounds (inclusive, in tokens; `max_length` bounds prompt +
    /// the longer completion) and, with `drop_identical`, having chosen != rejected:
    /// `(kept indices ascending, {reason: pairs dropped})`.
    #[pyo3(signature = (*, min_prompt_length=None, max_prompt_length=None,
        min_completion_length=None, max_completion_length=None, max_length=None,
        drop_identical=false))]
    #[allow(clippy::too_many_arguments)]
    fn filter<'py>(
        &self,
        py: Python<'py>,
        min_prompt_length: Option<&Bound<'py, PyAny>>,
        max_prompt_length: Option<&Bound<'py, PyAny>>,
        min_completion_length: Option<&Bound<'py, PyAny>>,
        max_completion_length: Option<&Bound<'py, PyAny>>,
        max_length: Option<&Bound<'py, PyAny>>,
        drop_identical: bool,
    ) -> PyResult<(Array<'py>, Bound<'py, PyDict>)> {
        let o = FilterOptions {
            min_prompt_length: count_arg("min_prompt_length", min_prompt_length)?,
            max_prompt_length: count_arg("max_prompt_length", max_prompt_length)?,
            min_completion_length: count_arg("min_completion_length", min_completion_length)?,
            max_completion_length: count_arg("max_completion_length", max_completion_length)?,
            max_length: count_arg("max_length", max_length)?,
            drop_identical,
        };
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let (kept, dropped) = py.detach(|| filter(&cols, &o)).map_err(to_py)?;
        let counts = PyDict::new(py);
        for (reason, n) in REASONS.iter().zip(dropped) {
            counts.set_item(reason, n)?;
        }
        Ok((vec_i64(py, kept), counts))
    }

    /// Indices (ascending) of the first occurrence of each distinct (prompt, chosen, rejected).
    fn deduplicate<'py>(&self, py: Python<'py>) -> PyResult<Array<'py>> {
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let kept = py.detach(|| deduplicate(&cols)).map_err(to_py)?;
        Ok(vec_i64(py, kept))
    }

    /// Per column: the CRC-32 of its `(n,)` int64 lengths, then of its ids as int64 in runs of
    /// `chunk` (the digest behind `PreferenceDataset.fingerprint`).
    #[pyo3(signature = (chunk = 1 << 22))]
    fn checksums(&self, py: Python<'_>, chunk: usize) -> PyResult<Vec<Vec<u32>>> {
        if chunk == 0 {
            return Err(to_py(RloxError::value("chunk", "must be >= 1")));
        }
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let as_bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        Ok(py.detach(|| {
            let lengths = cols.lengths();
            (0..3)
                .map(|c| {
                    let mut crcs = vec![disk::crc32(&as_bytes(&lengths[c]))];
                    cols.for_each_chunk(c, chunk, |run| crcs.push(disk::crc32(&as_bytes(run))));
                    crcs
                })
                .collect()
        }))
    }

    /// Write the token file (see `rlox.data`) to `path`; returns its sections as dicts.
    fn save<'py>(&self, py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyList>> {
        let g = self.guards(py);
        let cols = columns(&g).map_err(to_py)?;
        let sections = py.detach(|| disk::save(&path, &cols)).map_err(to_py)?;
        let out = PyList::empty(py);
        for s in sections {
            let d = PyDict::new(py);
            d.set_item("name", s.name)?;
            d.set_item("dtype", s.dtype)?;
            d.set_item("offset", s.offset)?;
            d.set_item("count", s.count)?;
            d.set_item("crc32", s.crc32)?;
            out.append(d)?;
        }
        Ok(out)
    }
}

/// CRC-32 of a contiguous numpy array's bytes (computed in parallel, GIL released).
#[pyfunction]
fn crc32(py: Python<'_>, array: &Bound<'_, PyAny>) -> PyResult<u32> {
    let arr = ndarray("array", array, 1)?;
    if !arr.is_c_contiguous() {
        return Err(to_py(RloxError::value("array", "must be contiguous")));
    }
    let nbytes = arr.len() * arr.dtype().itemsize();
    // SAFETY: a live, contiguous numpy array of `nbytes` bytes, only read while `arr` is held.
    let bytes = unsafe {
        std::slice::from_raw_parts((*arr.as_array_ptr()).fields.data as *const u8, nbytes)
    };
    Ok(py.detach(|| disk::crc32(bytes)))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PairStore>()?;
    m.add_function(wrap_pyfunction!(crc32, m)?)?;
    Ok(())
}
