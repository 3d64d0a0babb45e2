"""rlox.text.tokenize_preferences against slow per-row references, on tokenizers trained here."""

from __future__ import annotations

import dataclasses
import json
import random
import warnings
from types import SimpleNamespace

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from rlox.text import TokenizedPairs, tokenize_preferences

FIELDS = ("prompt", "chosen", "rejected")
WORDS = (
    "the a of and to in is that it for on with as was by at from this are be or an which "
    "model token tokenizer world data train prompt answer question reward policy better worse "
    "because language sentence example value preference chosen rejected merge boundary"
).split()
# Chat template in the style of many instruct models: BOS rendered by the template, EOS per turn.
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# No BOS in the template; the generation prompt ends with a space that merges with the answer.
CHAT_SPACE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(4, 14))
        out.append(" ".join(words).capitalize() + rng.choice(".!?"))
    return out


def train_bpe(bos: bool) -> Tokenizer:
    """Byte-level BPE (lossless) trained on generated sentences; ``bos``: prepend <s> like Llama."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences(300), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


@pytest.fixture(scope="session")
def bpe() -> Tokenizer:
    return train_bpe(bos=True)


@pytest.fixture(scope="session")
def bpe_plain() -> Tokenizer:
    return train_bpe(bos=False)


def wrap(raw: Tokenizer, chat_template: str | None = CHAT) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="</s>", bos_token="<s>", pad_token="<pad>"
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def hf(bpe) -> PreTrainedTokenizerFast:
    return wrap(bpe)


@pytest.fixture(scope="session")
def wordlevel() -> Tokenizer:
    """Whitespace word tokenizer: a whitespace-only text has zero tokens."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    return tok


def rows(out: TokenizedPairs, field: str) -> list[list[int]]:
    values, offsets = getattr(out, f"{field}_values"), getattr(out, f"{field}_offsets")
    return [values[offsets[i] : offsets[i + 1]].tolist() for i in range(out.num_pairs)]


def as_lists(out: TokenizedPairs) -> dict[str, list[list[int]]]:
    return {f: rows(out, f) for f in FIELDS}


def quiet(*args, **kwargs) -> TokenizedPairs:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return tokenize_preferences(*args, **kwargs)


def pairwise(items: list[str]) -> list[tuple[str, str]]:
    return list(zip(items[::2], items[1::2], strict=False))


def check_layout(out: TokenizedPairs, n: int) -> None:
    assert out.num_pairs == len(out) == n
    for f in FIELDS:
        values, offsets = getattr(out, f"{f}_values"), getattr(out, f"{f}_offsets")
        assert values.dtype == np.int32 and values.ndim == 1
        assert offsets.dtype == np.int64 and offsets.shape == (n + 1,)
        assert offsets[0] == 0 and offsets[-1] == values.size and np.all(np.diff(offsets) >= 0)


# --------------------------------------------------------------------------------------------
# slow references: one row at a time through the transformers tokenizer's own __call__


def reference_standard(records, tok, add_eos=True):
    eos = tok.eos_token_id
    out, non_prefix = {f: [] for f in FIELDS}, 0
    for r in records:
        prompt = tok(r["prompt"])["input_ids"]
        out["prompt"].append(prompt)
        fell_back = False
        for f in ("chosen", "rejected"):
            full = tok(r["prompt"] + r[f])["input_ids"]
            if full[: len(prompt)] == prompt:
                completion = full[len(prompt) :]
            else:
                completion = tok(r[f], add_special_tokens=False)["input_ids"]
                fell_back = True
            if add_eos and completion[-1:] != [eos]:
                completion = completion + [eos]
            out[f].append(completion)
        non_prefix += fell_back
    return out, non_prefix


def reference_conversational(records, tok):
    bos = tok.bos_token_id
    out, non_prefix = {f: [] for f in FIELDS}, 0
    for r in records:
        chosen, rejected = r["chosen"], r["rejected"]
        if r.get("prompt") is None:
            k = 0
            while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
                k += 1
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        else:
            prompt = r["prompt"]
        prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        out["prompt"].append(prompt_ids if prompt_ids[:1] == [bos] else [bos, *prompt_ids])
        fell_back = False
        for f, completion in (("chosen", chosen), ("rejected", rejected)):
            full_text = tok.apply_chat_template(prompt + completion, tokenize=False)
            full = tok(full_text, add_special_tokens=False)["input_ids"]
            if full[: len(prompt_ids)] == prompt_ids:
                out[f].append(full[len(prompt_ids) :])
            else:
                assert full_text.startswith(prompt_text)
                suffix = full_text[len(prompt_text) :]
                out[f].append(tok(suffix, add_special_tokens=False)["input_ids"])
                fell_back = True
        non_prefix += fell_back
    return out, non_prefix


# --------------------------------------------------------------------------------------------
# standard format

FRAGMENTS = [*WORDS, " ", "  ", ".", ",", "\n", "wo", "ing", "é", "ü", "世界", "!?", "ken"]
text_st = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join)
records_st = st.lists(
    st.fixed_dictionaries({"prompt": text_st, "chosen": text_st, "rejected": text_st}),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=records_st, batch_size=st.integers(1, 4), add_eos=st.booleans())
def test_standard_matches_reference_and_round_trips(hf, bpe, records, batch_size, add_eos):
    out = quiet(records, hf, batch_size=batch_size, add_eos=add_eos)
    check_layout(out, len(records))
    expected, non_prefix = reference_standard(records, hf, add_eos=add_eos)
    assert as_lists(out) == expected
    assert out.non_prefix_prompts == non_prefix
    eos, bos = hf.eos_token_id, hf.bos_token_id
    got = as_lists(out)
    for i, r in enumerate(records):
        prompt = got["prompt"][i]
        assert prompt[0] == bos and bos not in prompt[1:]
        assert bpe.decode(prompt) == r["prompt"]
        for f in ("chosen", "rejected"):
            ids = got[f][i]
            assert (ids[-1] == eos) == add_eos and eos not in ids[:-1]
            body = ids[:-1] if add_eos else ids
            assert bpe.decode(body) == r[f]
            assert bpe.decode(prompt + body) == r["prompt"] + r[f]


def test_raw_tokenizer_matches_transformers_wrapper(bpe, hf):
    records = [{"prompt": s, "chosen": " " + c, "rejected": c} for s, c in pairwise(sentences(7))]
    assert as_lists(quiet(records, bpe)) == as_lists(quiet(records, hf))


def test_eos_appended_once(hf):
    eos = hf.eos_token_id
    records = [
        {"prompt": "The model", "chosen": " is better</s>", "rejected": " is worse"},
        {"prompt": "A token", "chosen": "</s>", "rejected": " merge"},
    ]
    got = as_lists(tokenize_preferences(records, hf))
    for f in ("chosen", "rejected"):
        for ids in got[f]:
            assert ids[-1] == eos and eos not in ids[:-1]
    assert got["chosen"][1] == [eos]
    no_eos = as_lists(tokenize_preferences(records, hf, add_eos=False))
    assert no_eos["rejected"] == [ids[:-1] for ids in got["rejected"]]
    assert no_eos["chosen"] == got["chosen"]


def test_bos_appears_once(hf, bpe_plain):
    bos = hf.bos_token_id
    records = [
        {"prompt": "<s>The prompt", "chosen": " answer", "rejected": " value"},
        {"prompt": "The prompt", "chosen": " answer", "rejected": " value"},
    ]
    prompts = rows(tokenize_preferences(records, hf), "prompt")
    assert prompts[0] == prompts[1] and prompts[0][0] == bos and bos not in prompts[0][1:]
    plain = rows(tokenize_preferences(records[1:], wrap(bpe_plain)), "prompt")
    assert plain == [bpe_plain.encode("The prompt").ids]


def test_non_prefix_fallback_warns_once_with_count(hf):
    word = next(
        w
        for w in sorted(WORDS, key=len, reverse=True)
        if len(hf(" " + w, add_special_tokens=False)["input_ids"]) == 1
    )
    assert len(word) >= 5
    records = [
        {"prompt": "The " + word[:3], "chosen": word[3:] + " is better", "rejected": " model"},
        {"prompt": "A model", "chosen": " answer", "rejected": " value"},
        {"prompt": "The value ", "chosen": "is chosen", "rejected": "is rejected"},
    ]
    with pytest.warns(UserWarning) as record:
        out = tokenize_preferences(records, hf, batch_size=2)
    assert len(record) == 1 and "2 of 3 prompts" in str(record[0].message)
    assert out.non_prefix_prompts == 2
    expected, non_prefix = reference_standard(records, hf)
    assert non_prefix == 2 and as_lists(out) == expected
    eos = hf.eos_token_id
    alone = hf(word[3:] + " is better", add_special_tokens=False)["input_ids"]
    assert rows(out, "chosen")[0] == alone + [eos]


def test_tokenizer_with_padding_and_truncation_is_not_used_as_configured(bpe):
    tok = Tokenizer.from_str(bpe.to_str())
    tok.enable_padding(length=64, pad_id=2, pad_token="<pad>")
    tok.enable_truncation(max_length=3)
    records = [{"prompt": "The model is", "chosen": " better than that", "rejected": " worse"}]
    assert as_lists(tokenize_preferences(records, tok)) == as_lists(
        tokenize_preferences(records, bpe)
    )
    assert tok.padding is not None and tok.truncation is not None


def test_empty_input_and_layout(hf):
    out = tokenize_preferences([], hf)
    check_layout(out, 0)
    assert out.non_prefix_prompts == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.num_pairs = 3


def test_show_progress_and_large_batches(hf):
    records = [{"prompt": p, "chosen": " " + c, "rejected": c} for p, c in pairwise(sentences(40))]
    a = quiet(records, hf, show_progress=True, batch_size=7)
    b = quiet(records, hf, batch_size=10_000)
    assert as_lists(a) == as_lists(b)
    check_layout(a, len(records))


# --------------------------------------------------------------------------------------------
# conversational format


def msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def conversations() -> list[dict]:
    """Assistant turns start in lower case, so the space ending CHAT_SPACE's prompt merges."""
    s = [t.lower() if i in (1, 2, 5, 6, 10, 11) else t for i, t in enumerate(sentences(12, seed=1))]
    return [
        {
            "prompt": [msg("user", s[0])],
            "chosen": [msg("assistant", s[1])],
            "rejected": [msg("assistant", s[2])],
        },
        {
            "prompt": [msg("system", s[3]), msg("user", s[4])],
            "chosen": [msg("assistant", s[5])],
            "rejected": [msg("assistant", s[6])],
        },
        {
            "prompt": [msg("user", s[7]), msg("assistant", s[8]), msg("user", s[9])],
            "chosen": [msg("assistant", s[10])],
            "rejected": [msg("assistant", s[11] + " " + s[10])],
        },
    ]


def implicit(records: list[dict]) -> list[dict]:
    return [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]}
        for r in records
    ]


@pytest.mark.parametrize("template", [CHAT, CHAT_SPACE], ids=["bos-in-template", "space"])
def test_conversational_matches_reference(bpe, template):
    tok = wrap(bpe, template)
    records = conversations()
    out = quiet(records, tok, batch_size=2)
    check_layout(out, len(records))
    expected, non_prefix = reference_conversational(records, tok)
    assert as_lists(out) == expected and out.non_prefix_prompts == non_prefix
    bos = tok.bos_token_id
    for i, r in enumerate(records):
        prompt = rows(out, "prompt")[i]
        assert prompt[0] == bos and bos not in prompt[1:]
        text = tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False)
        decoded = bpe.decode(prompt + rows(out, "chosen")[i], skip_special_tokens=False)
        assert decoded == (text if template == CHAT else "<s>" + text)
    if template == CHAT:
        assert non_prefix == 0
        chosen = bpe.decode(rows(out, "chosen")[0], skip_special_tokens=False)
        assert chosen == records[0]["chosen"][0]["content"] + "</s>\n"
    else:
        assert non_prefix >= 2


def test_conversational_fallback_warns_once(bpe):
    tok = wrap(bpe, CHAT_SPACE)
    non_prefix = reference_conversational(conversations(), tok)[1]
    with pytest.warns(UserWarning) as record:
        out = tokenize_preferences(conversations(), tok, batch_size=1)
    assert len(record) == 1 and f"{non_prefix} of 3 prompts" in str(record[0].message)
    assert out.non_prefix_prompts == non_prefix >= 2


def test_conversational_implicit_prompt_is_shared_prefix(hf):
    records = conversations()
    explicit = tokenize_preferences(records, hf)
    implied = tokenize_preferences(implicit(records), hf)
    assert as_lists(implied) == as_lists(explicit)
    assert as_lists(implied) == reference_conversational(implicit(records), hf)[0]


def test_conversational_mixed_prompt_presence(hf):
    records = conversations()
    mixed = [records[0], implicit(records)[1], {**implicit(records)[2], "prompt": None}]
    assert as_lists(tokenize_preferences(mixed, hf)) == as_lists(tokenize_preferences(records, hf))


def test_conversational_template_mismatch_names_row(bpe):
    tok = wrap(bpe, CHAT.replace("<|assistant|>\n{% endif %}", "<|assistant|>\n<think>{% endif %}"))
    with pytest.raises(ValueError, match=r"chosen\[0\].*does not start with"):
        tokenize_preferences(conversations(), tok)


def test_conversational_template_error_names_row(bpe):
    tok = wrap(
        bpe,
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        + CHAT,
    )
    with pytest.raises(ValueError, match=r"prompt\[1\]: chat template failed.*no system"):
        tokenize_preferences(conversations(), tok)


# --------------------------------------------------------------------------------------------
# sources


def standard_records() -> list[dict]:
    s = sentences(9, seed=2)
    return [
        {"prompt": s[i], "chosen": " " + s[i + 1], "rejected": s[i + 2]} for i in range(0, 9, 3)
    ]


@pytest.mark.parametrize("make", [standard_records, conversations], ids=["standard", "chat"])
def test_sources_agree(hf, tmp_path, make):
    records = make()
    expected = as_lists(tokenize_preferences(records, hf))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("\n".join(json.dumps({**r, "extra": 1}) for r in records) + "\n\n")
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    dataset = datasets.Dataset.from_list(records + records).select([2, 1, 0, 3])
    sources = {
        "jsonl": jsonl,
        "jsonl-str": str(jsonl),
        "parquet": parquet,
        "table": pa.Table.from_pylist(records),
        "generator": (dict(r) for r in records),
        "tuple": tuple(records),
    }
    for name, source in sources.items():
        assert as_lists(tokenize_preferences(source, hf)) == expected, name
    got = as_lists(tokenize_preferences(dataset, hf))
    assert got == {f: [*expected[f][::-1], expected[f][0]] for f in FIELDS}


def test_unknown_suffix_and_malformed_jsonl(hf, tmp_path):
    with pytest.raises(ValueError, match=r"records_or_path.*'\.csv'"):
        tokenize_preferences(tmp_path / "pairs.csv", hf)
    path = tmp_path / "bad.jsonl"
    good = json.dumps(standard_records()[0])
    path.write_text(f"{good}\n\n{{'prompt': 1}}\n{good}\n")
    with pytest.raises(ValueError, match=r"line 3: malformed JSON"):
        tokenize_preferences(path, hf)


# --------------------------------------------------------------------------------------------
# bad input names the field and the record index


def std(i: int, **changes) -> list[dict]:
    records = standard_records()
    records[i] = {k: v for k, v in {**records[i], **changes}.items() if v != "DROP"}
    return records


def chat(i: int, implied: bool = False, **changes) -> list[dict]:
    records = implicit(conversations()) if implied else conversations()
    records[i] = {k: v for k, v in {**records[i], **changes}.items() if v != "DROP"}
    return records


BAD = {
    "missing chosen": (std(1, chosen="DROP"), ValueError, r"chosen\[1\]: missing"),
    "missing prompt": (std(2, prompt="DROP"), ValueError, r"prompt\[2\]: missing"),
    "null rejected": (std(1, rejected=None), ValueError, r"rejected\[1\]: missing"),
    "number chosen": (std(1, chosen=3), TypeError, r"chosen\[1\]: expected str"),
    "number chosen 0": (std(0, chosen=3.5), TypeError, r"chosen\[0\]: expected str"),
    "list in standard": (std(2, rejected=[msg("a", "b")]), TypeError, r"rejected\[2\]"),
    "empty prompt": (std(1, prompt=""), ValueError, r"prompt\[1\]: empty prompt"),
    "empty completion": (std(2, rejected=""), ValueError, r"rejected\[2\]: empty completion"),
    "lowest index first": (
        [*std(1, chosen="DROP")[:2], std(2, prompt=1)[2]],
        ValueError,
        r"chosen\[1\]: missing",
    ),
    "not a mapping": ([*standard_records(), "text"], TypeError, r"records\[3\]"),
    "chat str chosen": (chat(1, chosen="hi"), TypeError, r"chosen\[1\]: expected a list"),
    "chat bad message": (chat(2, rejected=[{"role": "x"}]), TypeError, r"rejected\[2\]: message 0"),
    "chat empty chosen": (chat(1, chosen=[]), ValueError, r"chosen\[1\]: empty completion"),
    "chat empty prompt": (chat(1, prompt=[]), ValueError, r"prompt\[1\]: empty prompt"),
    "chat str prompt": (chat(0, prompt="hi"), TypeError, r"prompt\[0\]: expected a list"),
    "chat missing rejected": (chat(2, rejected="DROP"), ValueError, r"rejected\[2\]: missing"),
    "chat no shared prefix": (
        chat(1, implied=True, chosen=[msg("user", "x"), msg("assistant", "y")]),
        ValueError,
        r"prompt\[1\]: empty prompt",
    ),
    "chat nothing after prefix": (
        chat(2, implied=True, rejected=conversations()[2]["prompt"]),
        ValueError,
        r"rejected\[2\]: empty completion",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_records(hf, name):
    records, error, pattern = BAD[name]
    with pytest.raises(error, match=pattern):
        tokenize_preferences(records, hf)


def test_zero_token_fields_name_the_row_in_later_batches(wordlevel):
    records = [
        {"prompt": "the model", "chosen": " is better", "rejected": " worse"} for _ in range(6)
    ]
    records[5] = {**records[5], "chosen": "   "}
    with pytest.raises(ValueError, match=r"chosen\[5\]: empty completion"):
        tokenize_preferences(records, wordlevel, batch_size=2)
    records[4] = {**records[4], "prompt": " \n "}
    with pytest.raises(ValueError, match=r"prompt\[4\]: empty prompt"):
        tokenize_preferences(records, wordlevel, batch_size=2)


def test_tokenizer_errors(bpe, hf, wordlevel):
    records = standard_records()
    with pytest.raises(ValueError, match="tokenizer.*chat template"):
        tokenize_preferences(conversations(), bpe)
    with pytest.raises(ValueError, match="tokenizer.*chat template"):
        tokenize_preferences(conversations(), wrap(bpe, chat_template=None))
    no_eos = Tokenizer(models.WordLevel({"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    no_eos.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="tokenizer: has no EOS"):
        tokenize_preferences(records, no_eos)
    out = quiet([{"prompt": "the", "chosen": "the x", "rejected": "x"}], no_eos, add_eos=False)
    assert rows(out, "chosen") == [[1, 0]]
    with pytest.raises(TypeError, match="tokenizer: expected"):
        tokenize_preferences(records, object())
    huge = SimpleNamespace(backend_tokenizer=wordlevel, eos_token_id=2**31)
    with pytest.raises(ValueError, match="tokenizer: EOS id .* int32"):
        tokenize_preferences(records, huge)
    with pytest.raises(ValueError, match="batch_size"):
        tokenize_preferences(records, hf, batch_size=0)
    with pytest.raises(TypeError, match="records_or_path"):
        tokenize_preferences(records[0], hf)


def test_dataset_from_text_trains_end_to_end(tmp_path, hf):
    """Text file -> PreferenceDataset -> saved store -> packed batch -> one DPO step."""
    import copy

    import torch

    from rlox import DPO, PreferenceDataset
    from rlox.models import TinyCausalLM, TinyLMConfig

    texts = sentences(24, seed=3)
    records = [
        {"prompt": texts[i], "chosen": " " + texts[i + 1], "rejected": " " + texts[i + 2]}
        for i in range(0, 21, 3)
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ds = PreferenceDataset.from_text(path, hf)
    want = quiet(records, hf)
    assert len(ds) == len(records)
    for name in ("prompt", "chosen", "rejected"):
        assert [ds[i][name].tolist() for i in range(len(ds))] == rows(want, name)
    store = PreferenceDataset.load(ds.save(tmp_path / "store"), verify=True)
    torch.manual_seed(0)
    model = TinyCausalLM(TinyLMConfig(vocab_size=len(hf), d_model=16, n_layers=1, n_heads=2))
    trainer = DPO(model, copy.deepcopy(model))
    metrics = trainer.train_step(store.collate(range(len(store)), layout="packed"))
    assert metrics["skipped"] == 0.0 and metrics["loss"] > 0
