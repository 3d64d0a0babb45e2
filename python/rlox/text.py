"""Tokenize preference records (prompt / chosen / rejected) into flat token columns.

``tokenize_preferences`` reads records in TRL's standard format (strings) or conversational format
(chat messages) and returns Arrow-style columns: per field, one flat int32 array of token ids and an
int64 offsets array of length n + 1, so that row i is ``values[offsets[i]:offsets[i + 1]]``.

Completion ids are the ids of ``prompt + completion`` after the prompt's own ids, so they are the
tokens a causal model sees after the prompt; where the tokenizer merges across the boundary (the
prompt's ids are not a prefix), the completion is tokenized on its own. Batches are encoded on all
cores by rlox's Rust encoder (the ``tokenizers`` crate, loaded from the tokenizer's JSON), which
writes ids straight into flat int32 columns, in a worker thread while the previous batch is split
into columns with vectorised numpy. A tokenizer that cannot be serialised to JSON (custom Python
components) is encoded through its own ``encode_batch`` instead.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import tokenizers
from tqdm.auto import tqdm

from rlox._rlox import TokenEncoder

__all__ = ["TokenizedPairs", "tokenize_preferences"]

FIELDS = ("prompt", "chosen", "rejected")
COMPLETIONS = ("chosen", "rejected")
_MISSING: Any = object()
_Columns = tuple[list[Any], list[Any], list[Any]]  # prompt, chosen, rejected
_INT32_MAX = int(np.iinfo(np.int32).max)
# Added special tokens taken as EOS for a bare ``tokenizers.Tokenizer``, in order of preference.
_EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")


@dataclass(frozen=True, eq=False)
class TokenizedPairs:
    """Token ids of n preference pairs as flat columns.

    Row i of a field is ``<field>_values[<field>_offsets[i]:<field>_offsets[i + 1]]``.

    Attributes:
        prompt_values: int32 [P], prompt ids of all rows concatenated, with the special tokens the
            tokenizer puts before a sequence (a BOS) once at the start of each prompt.
        prompt_offsets: int64 [n + 1], row boundaries into ``prompt_values``, starting at 0.
        chosen_values: int32 [C], chosen completion ids (ending with EOS, see ``add_eos``).
        chosen_offsets: int64 [n + 1].
        rejected_values: int32 [R], rejected completion ids.
        rejected_offsets: int64 [n + 1].
        num_pairs: n.
        non_prefix_prompts: rows whose prompt ids were not a prefix of the ids of prompt +
            completion (for chosen, rejected or both), so a completion was tokenized on its own.
    """

    prompt_values: np.ndarray
    prompt_offsets: np.ndarray
    chosen_values: np.ndarray
    chosen_offsets: np.ndarray
    rejected_values: np.ndarray
    rejected_offsets: np.ndarray
    num_pairs: int
    non_prefix_prompts: int

    def __len__(self) -> int:
        return self.num_pairs

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The six columns in :meth:`PreferenceDataset.from_arrays` order."""
        return (
            self.prompt_values,
            self.prompt_offsets,
            self.chosen_values,
            self.chosen_offsets,
            self.rejected_values,
            self.rejected_offsets,
        )


@dataclass(frozen=True)
class _Encoder:
    backend: tokenizers.Tokenizer
    eos_id: int | None
    lead: np.ndarray  # int32 [k]: special ids the tokenizer puts before a single sequence
    chat: Any  # the transformers tokenizer (for chat templates), or None
    fast: TokenEncoder | None  # the Rust encoder, or None when the JSON cannot be loaded


@dataclass(frozen=True)
class _Batch:
    prompt: tuple[np.ndarray, np.ndarray]  # (values int32, lengths int64 [b])
    chosen: tuple[np.ndarray, np.ndarray]
    rejected: tuple[np.ndarray, np.ndarray]
    non_prefix: int


@dataclass(frozen=True)
class _Job:
    """Texts of records ``first .. first + b - 1`` to encode, and how to encode a completion alone."""

    first: int
    prompt_texts: list[str]
    full_texts: tuple[list[str], list[str]]  # prompt + chosen, prompt + rejected
    completion_text: Callable[[int, int], str]  # (side, row in batch) -> completion on its own


def tokenize_preferences(
    records_or_path: str | os.PathLike[str] | Iterable[Mapping[str, Any]] | pa.Table,
    tokenizer: Any,
    *,
    add_eos: bool = True,
    batch_size: int = 1024,
    show_progress: bool = False,
) -> TokenizedPairs:
    """Tokenize preference pairs into flat prompt / chosen / rejected token columns.

    Args:
        records_or_path: a ``.jsonl`` or ``.parquet`` file, a ``pyarrow.Table``, a
            ``datasets.Dataset`` or any iterable of mappings. Records are either standard
            (``prompt``, ``chosen``, ``rejected`` strings) or conversational (``chosen`` and
            ``rejected`` lists of ``{"role", "content"}`` messages, optional ``prompt`` list; without
            it the prompt is the leading messages that chosen and rejected share). The format of
            record 0 applies to all. Conversational records are rendered with the chat template,
            the prompt with ``add_generation_prompt=True``; the template ends each turn, so no EOS
            is added.
        tokenizer: a ``tokenizers.Tokenizer`` or a fast ``transformers`` tokenizer. Conversational
            records need a ``transformers`` tokenizer with a chat template. A bare
            ``tokenizers.Tokenizer``'s EOS is its first special token among ``</s>``,
            ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``, ``<|eos|>``, ``[EOS]``.
        add_eos: standard format only: append the EOS id to completions not already ending with it.
        batch_size: records encoded per call of the tokenizer's parallel batch encoder.
        show_progress: show a progress bar over records.

    Returns:
        ``TokenizedPairs`` with n = number of records. Special tokens the tokenizer adds before a
        sequence (a BOS) start each prompt once, also when the text or chat template already
        holds them; special tokens it adds after a sequence are not added.

    Raises:
        ValueError / TypeError naming the field and record index (``chosen[17]: missing``) for a
        missing, mistyped or empty field, the line number for malformed JSON, and ``tokenizer`` for
        a tokenizer that cannot serve the format.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    enc = _resolve_tokenizer(tokenizer)
    prompts, chosens, rejecteds = _read_columns(records_or_path)
    n = len(chosens)
    conversational = n > 0 and _is_conversational(chosens[0])
    if conversational:
        if enc.chat is None or not getattr(enc.chat, "chat_template", None):
            raise ValueError(
                "tokenizer: conversational records need a transformers tokenizer with a chat "
                "template (tokenizer.chat_template)"
            )
    elif n > 0:
        _check_standard((prompts, chosens, rejecteds))
        if add_eos and enc.eos_id is None:
            raise ValueError(
                "tokenizer: has no EOS token to append to completions; give it one (e.g. "
                "PreTrainedTokenizerFast(tokenizer_object=..., eos_token=...)) or pass add_eos=False"
            )

    make_job = partial(_conversational_job, enc) if conversational else _standard_job
    jobs = (
        make_job(prompts, chosens, rejecteds, first, min(first + batch_size, n))
        for first in range(0, n, batch_size)
    )
    batches: list[_Batch] = []
    with (
        tqdm(total=n, unit="pair", desc="tokenize", disable=not show_progress) as bar,
        closing(_encode_ahead(enc, jobs)) as encoded,
    ):
        for job, ids in encoded:
            batches.append(_assemble(enc, job, ids, add_eos and not conversational))
            bar.update(len(job.prompt_texts))

    non_prefix = sum(b.non_prefix for b in batches)
    if non_prefix:
        warnings.warn(
            f"{non_prefix} of {n} prompts are not a token prefix of prompt + completion (the "
            "tokenizer merges across the boundary); their completions were tokenized on their own",
            UserWarning,
            stacklevel=2,
        )
    columns = {}
    for field in FIELDS:
        parts = [getattr(b, field) for b in batches]
        values = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int32)
        offsets = np.zeros(n + 1, np.int64)
        if parts:
            np.cumsum(np.concatenate([p[1] for p in parts]), out=offsets[1:])
        columns[f"{field}_values"] = values
        columns[f"{field}_offsets"] = offsets
    return TokenizedPairs(**columns, num_pairs=n, non_prefix_prompts=non_prefix)


# --------------------------------------------------------------------------------------------
# Tokenizer


def _resolve_tokenizer(tokenizer: Any) -> _Encoder:
    if isinstance(tokenizer, tokenizers.Tokenizer):
        backend, eos_id, chat = tokenizer, _guess_eos(tokenizer), None
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(
                "tokenizer: expected a tokenizers.Tokenizer or a fast transformers tokenizer, got "
                f"{type(tokenizer).__name__}"
            )
        eos_id, chat = getattr(tokenizer, "eos_token_id", None), tokenizer
    if eos_id is not None and not 0 <= eos_id <= _INT32_MAX:
        raise ValueError(f"tokenizer: EOS id {eos_id} does not fit int32")
    if backend.truncation is not None or backend.padding is not None:
        backend = tokenizers.Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    return _Encoder(backend, eos_id, _leading_special_ids(backend), chat, _rust_encoder(backend))


def _rust_encoder(backend: tokenizers.Tokenizer) -> TokenEncoder | None:
    """The Rust encoder of ``backend``, or None when its JSON cannot be produced or loaded."""
    try:
        return TokenEncoder(backend.to_str())
    except Exception:
        return None


def _guess_eos(tokenizer: tokenizers.Tokenizer) -> int | None:
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return next((special[name] for name in _EOS_NAMES if name in special), None)


def _leading_special_ids(backend: tokenizers.Tokenizer) -> np.ndarray:
    """Ids the post-processor puts before a single sequence (e.g. BOS), int32 [k]."""
    for probe in ("a", "0", "x", "hello", " "):
        raw = backend.encode(probe, add_special_tokens=False).ids
        if raw:
            full = backend.encode(probe, add_special_tokens=True).ids
            for k in range(len(full) - len(raw) + 1):
                if full[k : k + len(raw)] == raw:
                    return np.asarray(full[:k], np.int32)
            break
    return np.empty(0, np.int32)


def _encode(enc: _Encoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ids of ``texts`` without special tokens: values int32 [T] and offsets int64 [m + 1]."""
    if enc.fast is not None:
        return enc.fast.encode(texts)
    encode = getattr(enc.backend, "encode_batch_fast", enc.backend.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(np.fromiter(map(len, ids), np.int64, count=len(ids)), out=offsets[1:])
    try:
        values = np.fromiter(itertools.chain.from_iterable(ids), np.int32, count=int(offsets[-1]))
    except OverflowError as e:
        raise ValueError(f"tokenizer: a token id does not fit int32 ({e})") from None
    return values, offsets


def _encode_ahead(
    enc: _Encoder, jobs: Iterable[_Job]
) -> Iterator[tuple[_Job, tuple[np.ndarray, np.ndarray]]]:
    """Yield each job with its ids, encoding the next job in a worker thread meanwhile.

    The encoder releases the GIL while encoding, so preparing the next job's texts and assembling
    the previous job's columns overlap with encoding.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[_Job, Future[tuple[np.ndarray, np.ndarray]]] | None = None
        for job in jobs:
            texts = [*job.prompt_texts, *job.full_texts[0], *job.full_texts[1]]
            future = pool.submit(_encode, enc, texts)
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = job, future
        if pending is not None:
            yield pending[0], pending[1].result()


# --------------------------------------------------------------------------------------------
# Records


def _read_columns(source: Any) -> _Columns:
    """The prompt, chosen and rejected columns as lists (``_MISSING`` or None where absent)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return _columns_from_rows(_read_jsonl(path))
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(path).names
            return _columns_from_table(
                pq.read_table(path, columns=[f for f in FIELDS if f in names])
            )
        raise ValueError(
            f"records_or_path: unsupported file suffix {suffix!r} ({path}); expected .jsonl or "
            ".parquet"
        )
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        return _columns_from_table(source)
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(source, datasets.Dataset):
        present = [f for f in FIELDS if f in source.column_names]
        return _columns_from_table(source.select_columns(present).with_format("arrow")[:])
    if isinstance(source, (bytes, Mapping)) or not isinstance(source, Iterable):
        raise TypeError(
            "records_or_path: expected a .jsonl / .parquet path or an iterable of records, got "
            f"{type(source).__name__}"
        )
    return _columns_from_rows(source)


def _read_jsonl(path: Path) -> list[Any]:
    return list(jsonl_records(path))


def jsonl_records(path: Path, start: int = 0, stop: int | None = None) -> Iterator[Any]:
    """The records of non-blank lines ``start .. stop - 1`` (counted among non-blank lines)."""
    k = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if stop is not None and k >= stop:
                return
            k += 1
            if k <= start:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"records_or_path: {path}, line {lineno}: malformed JSON ({e.msg}, column "
                    f"{e.colno})"
                ) from None


def _columns_from_table(table: pa.Table | pa.RecordBatch) -> _Columns:
    names = table.schema.names
    p, c, r = (
        table.column(f).to_pylist() if f in names else [_MISSING] * table.num_rows for f in FIELDS
    )
    return p, c, r


def _columns_from_rows(rows: Iterable[Any]) -> _Columns:
    rows = rows if isinstance(rows, list) else list(rows)
    if not all(type(r) is dict for r in rows):
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise TypeError(f"records[{i}]: expected a mapping, got {type(r).__name__}")
    p, c, r = ([row.get(f, _MISSING) for row in rows] for f in FIELDS)
    return p, c, r


def _absent(value: Any) -> bool:
    return value is _MISSING or value is None


def _is_conversational(chosen0: Any) -> bool:
    if isinstance(chosen0, str):
        return False
    if isinstance(chosen0, (list, tuple)):
        return True
    if _absent(chosen0):
        raise ValueError("chosen[0]: missing")
    raise TypeError(
        "chosen[0]: expected str (standard format) or a list of messages (conversational "
        f"format), got {type(chosen0).__name__}"
    )


def _first_bad_string(column: list[Any]) -> int | None:
    return next(
        (
            i
            for i, v in enumerate(column)
            if (type(v) is not str and not isinstance(v, str)) or not v
        ),
        None,
    )


def _check_standard(columns: _Columns) -> None:
    """Raise for the lowest record index holding a missing, non-string or empty field."""
    bad = [(i, k) for k, col in enumerate(columns) if (i := _first_bad_string(col)) is not None]
    if not bad:
        return
    i, k = min(bad)
    field, value = FIELDS[k], columns[k][i]
    if _absent(value):
        raise ValueError(f"{field}[{i}]: missing")
    if not isinstance(value, str):
        raise TypeError(
            f"{field}[{i}]: expected str (standard format, as chosen[0] is a string), got "
            f"{type(value).__name__}"
        )
    raise ValueError(f"{field}[{i}]: empty {'prompt' if k == 0 else 'completion'}")


def _messages(value: Any, field: str, i: int) -> list[Any]:
    if _absent(value):
        raise ValueError(f"{field}[{i}]: missing")
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"{field}[{i}]: expected a list of messages (conversational format, as chosen[0] is "
            f"one), got {type(value).__name__}"
        )
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(f"{field}[{i}]: message {j} is not a mapping with 'role' and 'content'")
    return list(value)


# --------------------------------------------------------------------------------------------
# Batches


def _standard_job(
    prompts: list[str], chosens: list[str], rejecteds: list[str], first: int, stop: int
) -> _Job:
    p = prompts[first:stop]
    full = (
        [a + b for a, b in zip(p, chosens[first:stop], strict=True)],
        [a + b for a, b in zip(p, rejecteds[first:stop], strict=True)],
    )
    completions = (chosens, rejecteds)
    return _Job(first, p, full, lambda side, j: completions[side][first + j])


def _conversational_job(
    enc: _Encoder,
    prompts: list[Any],
    chosens: list[Any],
    rejecteds: list[Any],
    first: int,
    stop: int,
) -> _Job:
    prompt_convs, full_convs = [], ([], [])
    for i in range(first, stop):
        c = _messages(chosens[i], "chosen", i)
        r = _messages(rejecteds[i], "rejected", i)
        if _absent(prompts[i]):
            k = next(
                (k for k, (a, b) in enumerate(zip(c, r, strict=False)) if a != b),
                min(len(c), len(r)),
            )
            if k == 0:
                raise ValueError(
                    f"prompt[{i}]: empty prompt (none given, and chosen and rejected share no "
                    "leading messages)"
                )
            p, c, r = c[:k], c[k:], r[k:]
        else:
            if isinstance(prompts[i], str):
                raise TypeError(
                    f"prompt[{i}]: expected a list of messages (conversational format), got str; "
                    "drop the prompt field to use the leading messages chosen and rejected share"
                )
            p = _messages(prompts[i], "prompt", i)
            if not p:
                raise ValueError(f"prompt[{i}]: empty prompt")
        for field, completion in zip(COMPLETIONS, (c, r), strict=True):
            if not completion:
                raise ValueError(f"{field}[{i}]: empty completion")
        prompt_convs.append(p)
        full_convs[0].append(p + c)
        full_convs[1].append(p + r)

    prompt_texts = _render(enc.chat, prompt_convs, "prompt", first, add_generation_prompt=True)
    full_texts = tuple(
        _render(enc.chat, convs, field, first)
        for field, convs in zip(COMPLETIONS, full_convs, strict=True)
    )

    def suffix(side: int, j: int) -> str:
        text, prefix = full_texts[side][j], prompt_texts[j]
        if not text.startswith(prefix):
            field = COMPLETIONS[side]
            raise ValueError(
                f"{field}[{first + j}]: the chat template's rendering of prompt + {field} does not "
                "start with its rendering of the prompt (with add_generation_prompt=True)"
            )
        return text[len(prefix) :]

    return _Job(first, prompt_texts, full_texts, suffix)


def _render(chat: Any, convs: list[list[Any]], field: str, first: int, **kwargs: Any) -> list[str]:
    """Chat-template renderings of ``convs``; on failure, name the first record that fails."""
    try:
        return list(chat.apply_chat_template(convs, tokenize=False, **kwargs))
    except Exception:
        for j, conv in enumerate(convs):
            try:
                chat.apply_chat_template(conv, tokenize=False, **kwargs)
            except Exception as e:
                raise ValueError(f"{field}[{first + j}]: chat template failed: {e}") from e
        raise


def _assemble(
    enc: _Encoder, job: _Job, encoded: tuple[np.ndarray, np.ndarray], add_eos: bool
) -> _Batch:
    """Split a batch's ids (prompts, then prompt + chosen, then prompt + rejected) into columns."""
    b, first = len(job.prompt_texts), job.first
    values, offsets = encoded
    lengths = np.diff(offsets)
    lp, lf = lengths[:b], lengths[b:].reshape(2, b)
    if (empty := np.flatnonzero(lp == 0)).size:
        raise ValueError(f"prompt[{first + empty[0]}]: empty prompt")

    # Prefix check, vectorised over the prompt tokens: compare each prompt token with the token at
    # the same position of both full encodings, and count mismatches per row by cumulative sums.
    n_prompt = int(offsets[b])
    full_starts = offsets[b:-1].reshape(2, b)
    gather = np.arange(n_prompt) + np.repeat(full_starts - offsets[:b], lp, axis=1)
    np.minimum(gather, values.size - 1, out=gather)
    mismatch = np.zeros((2, n_prompt + 1), np.int64)
    np.cumsum(values[gather] != values[:n_prompt], axis=1, out=mismatch[:, 1:])
    ok = (lp <= lf) & (mismatch[:, offsets[1 : b + 1]] == mismatch[:, offsets[:b]])

    starts, counts = full_starts + lp, lf - lp
    src = values
    if not ok.all():
        sides, rows = np.nonzero(~ok)
        alone = [job.completion_text(int(s), int(j)) for s, j in zip(sides, rows, strict=True)]
        alone_values, alone_offsets = _encode(enc, alone)
        starts[sides, rows] = values.size + alone_offsets[:-1]
        counts[sides, rows] = np.diff(alone_offsets)
        src = np.concatenate([values, alone_values])
    if (empty := np.argwhere(counts.T == 0)).size:
        j, side = empty[0]
        raise ValueError(f"{COMPLETIONS[side]}[{first + j}]: empty completion")

    eos = np.zeros((2, b), np.int64)
    if add_eos:
        eos[...] = src[starts + counts - 1] != enc.eos_id
        src = np.append(src, np.int32(enc.eos_id))
    completions = tuple(
        (
            _segments(src, (starts[s], np.full(b, src.size - 1)), (counts[s], eos[s])),
            counts[s] + eos[s],
        )
        for s in range(2)
    )

    k = enc.lead.size
    if k:
        has_lead = lp >= k
        for t in range(k):
            has_lead &= values[np.minimum(offsets[:b] + t, values.size - 1)] == enc.lead[t]
        lead_counts = np.where(has_lead, 0, k)
        prompt_values = _segments(
            np.concatenate([enc.lead, values[:n_prompt]]),
            (np.zeros(b, np.int64), offsets[:b] + k),
            (lead_counts, lp),
        )
        prompt = (prompt_values, lp + lead_counts)
    else:
        prompt = (values[:n_prompt].copy(), lp)
    return _Batch(prompt, completions[0], completions[1], int(np.count_nonzero(~ok.all(axis=0))))


def _segments(
    src: np.ndarray, starts: Sequence[np.ndarray], counts: Sequence[np.ndarray]
) -> np.ndarray:
    """Concatenate, row by row, the segments ``src[s[i]:s[i] + c[i]]`` of each (s, c) pair.

    ``starts`` and ``counts`` hold one int64 [b] array per segment kind; row i's output is its first
    kind's segment, then its second's, and so on.
    """
    s = np.stack(starts, axis=1).ravel()
    c = np.stack(counts, axis=1).ravel()
    ends = np.cumsum(c)
    index = np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64)
    index += np.repeat(s - (ends - c), c)
    return src[index]
