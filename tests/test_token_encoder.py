"""rlox's Rust encoder (``TokenEncoder``) against the ``tokenizers`` Python package, and the fallback."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from rlox import text
from rlox._rlox import TokenEncoder
from rlox.text import tokenize_preferences

WORDS = "the a of café naïve Über to in 世界 model token déjà vu ok 42 x1 merge-boundary".split()


def corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 12))) for _ in range(n)]


def byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


def wordpiece() -> Tokenizer:
    """BERT-style: NFD, lowercase, strip accents, whitespace + punctuation split, WordPiece."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"])
    tok.train_from_iterator(corpus(), trainer)
    return tok


def unigram() -> Tokenizer:
    """SentencePiece-style: Metaspace pre-tokenizer and a Unigram model."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok


KINDS = {"byte_bpe": byte_bpe, "wordpiece": wordpiece, "unigram": unigram}


@pytest.fixture(scope="module", params=sorted(KINDS))
def tokenizer(request) -> Tokenizer:
    tok = KINDS[request.param]()
    tok.add_special_tokens(["<|end|>"])
    return tok


def python_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def flat_rows(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    assert values.dtype == np.int32 and offsets.dtype == np.int64
    assert offsets[0] == 0 and offsets[-1] == values.size and np.all(np.diff(offsets) >= 0)
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(offsets.size - 1)]


TEXT = st.lists(
    st.one_of(
        st.sampled_from(
            [*WORDS, " ", "  ", "\n", "\t", ".", "!?", "<|end|>", "ß", "🙂", "e\u0301"]
        ),
        st.text(max_size=6),
    ),
    max_size=20,
).map("".join)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(texts=st.lists(TEXT, max_size=40))
def test_rust_encoder_matches_python_tokenizers(tokenizer, texts):
    encoder = TokenEncoder(tokenizer.to_str())
    assert flat_rows(*encoder.encode(texts)) == python_ids(tokenizer, texts)


def test_rust_encoder_ignores_truncation_and_padding(tokenizer):
    texts = corpus(50)
    configured = Tokenizer.from_str(tokenizer.to_str())
    configured.enable_truncation(max_length=3)
    configured.enable_padding(length=64)
    got = flat_rows(*TokenEncoder(configured.to_str()).encode(texts))
    assert got == python_ids(tokenizer, texts)
    assert max(map(len, got)) > 3


def test_rust_encoder_bad_input():
    with pytest.raises(ValueError, match="^tokenizer: cannot load its JSON"):
        TokenEncoder("{not json")
    encoder = TokenEncoder(byte_bpe().to_str())
    with pytest.raises(TypeError):
        encoder.encode(["ok", 3])
    with pytest.raises(TypeError):
        encoder.encode("one string, not a list")


def records(n: int) -> list[dict[str, str]]:
    rows = corpus(3 * n)
    return [
        {"prompt": rows[3 * i], "chosen": " " + rows[3 * i + 1], "rejected": " " + rows[3 * i + 2]}
        for i in range(n)
    ]


def columns(out) -> list[np.ndarray]:
    return [getattr(out, f"{f}_{k}") for f in text.FIELDS for k in ("values", "offsets")]


def test_python_fallback_gives_identical_columns(monkeypatch):
    tok = byte_bpe()
    fast = tokenize_preferences(records(300), tok, batch_size=64)
    assert text._resolve_tokenizer(tok).fast is not None
    monkeypatch.setattr(text, "_rust_encoder", lambda backend: None)
    assert text._resolve_tokenizer(tok).fast is None
    slow = tokenize_preferences(records(300), tok, batch_size=64)
    for a, b in zip(columns(fast), columns(slow), strict=True):
        np.testing.assert_array_equal(a, b)
    assert fast.non_prefix_prompts == slow.non_prefix_prompts


class Lowercase:
    """A Python pre-tokenizer component: such a tokenizer cannot be written as JSON."""

    @staticmethod
    def lower(i, s):
        s.lowercase()
        return [s]

    def pre_tokenize(self, pretok) -> None:
        pretok.split(self.lower)


def test_unserialisable_tokenizer_uses_its_own_encoder():
    tok = byte_bpe()
    custom = Tokenizer.from_str(tok.to_str())
    custom.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.PreTokenizer.custom(Lowercase()),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    assert text._resolve_tokenizer(custom).fast is None
    out = tokenize_preferences(records(20), custom, add_eos=True, batch_size=8)
    rows = flat_rows(out.chosen_values, out.chosen_offsets)
    eos = tok.token_to_id("</s>")
    for r, row in zip(records(20), rows, strict=True):
        full = custom.encode(r["prompt"] + r["chosen"], add_special_tokens=False).ids
        prompt = custom.encode(r["prompt"], add_special_tokens=False).ids
        assert row == full[len(prompt) :] + [eos]
