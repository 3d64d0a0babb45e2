"""The rlox command line: help, config validation, errors, and prepare -> train -> eval -> plot."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import WORDS, make_model, make_tokenizer  # noqa: E402

from rlox import PreferenceDataset  # noqa: E402
from rlox.cli import TrainConfig, UsageError, load_train_config, main  # noqa: E402

COMMANDS = ("prepare", "train", "eval", "plot", "demo")


def records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Pairs whose chosen answer is always the same, so a few DPO steps learn the preference."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))
        out.append(
            {
                "prompt": prompt,
                "chosen": " better answer.",
                "rejected": " worse " + rng.choice(WORDS) + ".",
            }
        )
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny GPT-2 model directory with its tokenizer, and a jsonl of 40 pairs."""
    root = tmp_path_factory.mktemp("cli")
    tok = make_tokenizer()
    model = make_model("gpt2", len(tok), tok)
    model.save_pretrained(str(root / "model"))
    tok.save_pretrained(str(root / "model"))
    write_jsonl(root / "prefs.jsonl", records(40))
    return root


@pytest.fixture(scope="module")
def store(workdir) -> Path:
    out = workdir / "store"
    if not out.exists():
        code = main(
            [
                "prepare",
                "--data",
                str(workdir / "prefs.jsonl"),
                "--tokenizer",
                str(workdir / "model"),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        assert code == 0
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("rlox")
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------ help
def test_python_dash_m_help():
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "rlox", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: rlox")
    for command in COMMANDS:
        assert command in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: rlox {command}")
    assert "--debug" in out


def test_train_help_lists_every_option(capsys):
    _, out, _ = run(capsys, "train", "--help")
    for name in TrainConfig.option_names():
        if name != "lora":
            assert f"--{name.replace('_', '-')}" in out, name
    for flag in ("--lora", "--lora-r", "--lora-alpha", "--lora-dropout", "--lora-target-modules"):
        assert flag in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("rlox ")


# ------------------------------------------------------------------------- usage errors
def test_no_command(capsys):
    code, _, err = run(capsys)
    assert_one_line_error(code, err, 2, "COMMAND")


def test_unknown_flag_suggests(capsys, workdir):
    code, _, err = run(capsys, "train", "--learning-rte", "3")
    assert_one_line_error(code, err, 2, "rlox train:", "'--learning-rte'", "--learning-rate")


def test_bad_flag_value(capsys):
    code, _, err = run(capsys, "train", "--beta", "x")
    assert_one_line_error(code, err, 2, "--beta: expected a positive float, got 'x'")


def toml(path: Path, **values) -> Path:
    lines = []
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def base_config(workdir, store, tmp_path):
    return {
        "model": str(workdir / "model"),
        "data": str(store),
        "output_dir": str(tmp_path / "run"),
    }


def test_unknown_config_key(capsys, tmp_path, base_config):
    config = toml(tmp_path / "run.toml", **base_config, learning_rte=0.1)
    code, _, err = run(capsys, "train", "--config", config)
    assert_one_line_error(code, err, 2, "run.toml: unknown key 'learning_rte'", "learning_rate")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("beta", "x", "beta: expected a positive float, got 'x'"),
        ("beta", -1, "beta: expected a positive float, got -1"),
        ("epochs", 1.5, "epochs: expected a positive int, got 1.5"),
        ("layout", "ragged", "layout: expected one of 'padded'"),
        ("progress", "maybe", "progress: expected true or false"),
        ("loss_type", ["sigmoid", "nope"], "loss_type: expected a loss type"),
        ("device", "gpu7", "device: expected 'auto' or a torch device"),
    ],
)
def test_bad_config_value(capsys, tmp_path, base_config, key, value, message):
    config = toml(tmp_path / "run.toml", **(base_config | {key: value}))
    code, _, err = run(capsys, "train", "--config", config)
    assert_one_line_error(code, err, 2, "run.toml: " + message)


def test_invalid_toml(capsys, tmp_path):
    (tmp_path / "run.toml").write_text("beta = = 1\n")
    code, _, err = run(capsys, "train", "--config", tmp_path / "run.toml")
    assert_one_line_error(code, err, 2, "invalid TOML")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"data": "missing.jsonl"}, "data: "),
        ({"model": "no-model"}, "model: "),
        ({"eval_data": "missing-eval"}, "eval_data: "),
    ],
)
def test_missing_files(capsys, tmp_path, base_config, override, message):
    config = toml(tmp_path / "run.toml", **(base_config | override))
    code, _, err = run(capsys, "train", "--config", config)
    assert_one_line_error(code, err, 2, message, "not found")


def test_missing_config_and_required_keys(capsys, tmp_path, base_config):
    code, _, err = run(capsys, "train", "--config", tmp_path / "nope.toml")
    assert_one_line_error(code, err, 2, "nope.toml not found")
    config = toml(tmp_path / "run.toml", model=base_config["model"])
    code, _, err = run(capsys, "train", "--config", config)
    assert_one_line_error(code, err, 2, "data: required")


def test_inconsistent_loss_options(capsys, base_config):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base_config.items()]
    code, _, err = run(capsys, "train", *flags, "--loss-type", "hinge", "--label-smoothing", "0.1")
    assert_one_line_error(code, err, 2, "label_smoothing")
    code, _, err = run(capsys, "train", *flags, "--loss-type", "sigmoid,sft", "--loss-weights", "1")
    assert_one_line_error(code, err, 2, "loss_weights: expected 2 weight(s)")


def test_prepare_errors(capsys, workdir, tmp_path):
    code, _, err = run(
        capsys,
        "prepare",
        "--data",
        tmp_path / "x.jsonl",
        "--tokenizer",
        workdir / "model",
        "--out",
        tmp_path / "s",
    )
    assert_one_line_error(code, err, 2, "--data", "not found")
    code, _, err = run(capsys, "prepare", "--data", workdir / "prefs.jsonl", "--out", tmp_path)
    assert_one_line_error(code, err, 2, "--tokenizer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    code, _, err = run(
        capsys,
        "prepare",
        "--data",
        bad,
        "--tokenizer",
        workdir / "model",
        "--out",
        tmp_path / "s",
        "--no-progress",
    )
    assert_one_line_error(code, err, 1, "line 2")


def test_debug_shows_traceback(workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": \n')
    argv = ["prepare", "--data", str(bad), "--tokenizer", str(workdir / "model")]
    argv += ["--out", str(tmp_path / "s"), "--no-progress", "--debug"]
    with pytest.raises(ValueError, match="line 1"):
        main(argv)
    with pytest.raises(UsageError, match="--beta"):
        main(["--debug", "train", "--beta", "x"])


# ------------------------------------------------------------------------------ the config
def test_config_paths_overrides_and_lora(tmp_path, workdir, store):
    sub = tmp_path / "configs"
    sub.mkdir()
    model_rel = os.path.relpath(workdir / "model", sub)
    config_file = sub / "run.toml"
    config_file.write_text(
        f'model = "{model_rel}"\n'
        f'data = "{store}"\n'
        'output_dir = "out"\n'
        "beta = 0.2\n"
        "max_grad_norm = 'none'\n"
        'loss_type = ["sigmoid", "sft"]\n'
        "loss_weights = [1, 0.5]\n"
        "progress = false\n"
        "[lora]\n"
        "r = 4\n"
        'target_modules = ["c_attn"]\n'
    )
    config = load_train_config(config_file, {"beta": "0.3", "lora_alpha": "16", "epochs": 2})
    assert config.model == str((workdir / "model").resolve())
    assert config.output_dir == str((sub / "out").resolve())
    assert config.beta == 0.3 and config.epochs == 2
    assert config.max_grad_norm is None
    assert config.loss_type == ("sigmoid", "sft") and config.loss_weights == (1.0, 0.5)
    assert config.progress is False
    assert config.lora == {"r": 4, "target_modules": ["c_attn"], "lora_alpha": 16.0}
    assert config.fit_kwargs()["batch_size"] == 8
    assert config.dpo_kwargs(7)["pad_token_id"] == 7
    # the written config reads back to the same values
    again_file = tmp_path / "again.toml"
    again_file.write_text(config.to_toml())
    assert load_train_config(again_file) == config
    with pytest.raises(UsageError, match=r"lora\.r: expected a positive int"):
        load_train_config(config_file, {"lora_r": "0"})


def test_print_config(capsys, base_config):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base_config.items()]
    code, out, _ = run(capsys, "train", *flags, "--lr", "3e-4", "--print-config")
    assert code == 0
    assert "learning_rate = 0.0003" in out
    assert not Path(base_config["output_dir"]).exists()


# --------------------------------------------------------------------------------- prepare
def test_prepare_summary(capsys, workdir, tmp_path):
    out = tmp_path / "store"
    code, text, _ = run(
        capsys,
        "prepare",
        "--data",
        workdir / "prefs.jsonl",
        "--tokenizer",
        workdir / "model" / "tokenizer.json",
        "--out",
        out,
        "--max-length",
        "10",
        "--batch-size",
        "8",
        "--no-progress",
        "--json",
    )
    assert code == 0
    summary = json.loads(text)
    ds = PreferenceDataset.load(out)
    lens = ds.lengths()
    assert summary["pairs"] == len(ds) == 40
    assert summary["tokens"]["total"] == int(
        lens.prompt.sum() + lens.chosen.sum() + lens.rejected.sum()
    )
    over = (lens.prompt + lens.chosen > 10) | (lens.prompt + lens.rejected > 10)
    assert summary["truncation"]["pairs_truncated"] == int(over.sum()) > 0
    assert summary["truncation"]["pairs_dropped"] == int((lens.prompt >= 10).sum())
    assert set(summary["padding"]) == {"batch_size", "padded", "packed", "prefix_shared"}
    assert summary["padding"]["packed"] == 0.0
    assert 0 < summary["padding"]["padded"] < 1

    code, text, _ = run(
        capsys,
        "prepare",
        "--data",
        workdir / "prefs.jsonl",
        "--tokenizer",
        workdir / "model",
        "--out",
        tmp_path / "store2",
        "--no-progress",
    )
    assert code == 0
    assert "Saved 40 pairs" in text
    for word in (
        "tokens",
        "prompt",
        "chosen",
        "rejected",
        "truncation at max_length=1024",
        "padding",
    ):
        assert word in text


# ------------------------------------------------------------------------ end to end runs
def test_prepare_train_eval_plot(capsys, workdir, store, tmp_path):
    run_dir = tmp_path / "run"
    config = toml(
        tmp_path / "run.toml",
        model=str(workdir / "model"),
        data=str(store),
        eval_fraction=0.25,
        output_dir=str(run_dir),
        beta=0.5,
        learning_rate=1e-3,  # overridden below
        max_length=48,
        log_every=1,
        save_every=2,
        progress=False,
        threads=1,
    )
    code, out, err = run(
        capsys, "train", "--config", config, "--lr", "3e-3", "--batch-size", "6", "--max-steps", "4"
    )
    assert code == 0, err
    assert "saved the trained policy" in out
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert train_rows[0]["lr"] == pytest.approx(3e-3)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert any(r["split"] == "eval" for r in rows)
    assert (run_dir / "checkpoints" / "step-4").is_dir()
    assert load_train_config(run_dir / "train_config.toml").learning_rate == 3e-3

    from rlox.hf import load_pretrained

    final, tok = load_pretrained(run_dir / "final")
    base, _ = load_pretrained(workdir / "model")
    assert tok is not None
    assert any(
        not torch.equal(a, b) for a, b in zip(final.parameters(), base.parameters(), strict=True)
    )

    code, out, err = run(
        capsys,
        "eval",
        "--model",
        run_dir / "final",
        "--data",
        store,
        "--ref-model",
        workdir / "model",
        "--beta",
        "0.5",
        "--max-length",
        "48",
        "--json",
    )
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["pairs"] == 40
    assert set(metrics) >= {
        "loss",
        "reward_accuracy",
        "reward_margin",
        "chosen_reward",
        "rejected_reward",
        "chosen_logps",
        "rejected_logps",
    }
    assert metrics["reward_margin"] > 0 and metrics["reward_accuracy"] > 0.5

    # text output, text data, no reference: a note on stderr
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        run_dir / "final",
        "--data",
        workdir / "prefs.jsonl",
        "--max-length",
        "48",
    )
    assert code == 0
    assert "reward_accuracy" in out and "zero reference" in err

    code, out, _ = run(capsys, "plot", run_dir)
    assert code == 0
    paths = [Path(line) for line in out.split()]
    assert {p.name for p in paths} >= {"loss.png", "reward_accuracy.png", "lr.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapters"])
def test_train_lora(capsys, workdir, tmp_path, merge):
    run_dir = tmp_path / "run"
    argv = ["train", "--model", workdir / "model", "--data", workdir / "prefs.jsonl"]
    argv += ["--output-dir", run_dir, "--lora-r", "4", "--lora-target-modules", "c_attn"]
    argv += ["--max-steps", "2", "--batch-size", "8", "--max-length", "48", "--no-progress"]
    argv += ["--lr", "1e-2", "--threads", "1"]
    if not merge:
        argv.append("--no-merge-lora")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    from rlox.hf import is_peft_model, load_pretrained

    final = run_dir / "final"
    assert (final / "adapter_config.json").exists() is not merge
    model, _ = load_pretrained(final)
    assert is_peft_model(model) is not merge


def test_runtime_error_is_one_line(capsys, workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "", "rejected": "c"}) + "\n")
    code, _, err = run(
        capsys,
        "train",
        "--model",
        workdir / "model",
        "--data",
        bad,
        "--output-dir",
        tmp_path / "run",
        "--max-length",
        "48",
        "--no-progress",
    )
    assert_one_line_error(code, err, 1, "chosen[0]")


def test_demo(capsys):
    code, out, _ = run(
        capsys, "demo", "--quick", "--no-progress", "--steps", "2", "--sft-steps", "2"
    )
    assert code == 0
    assert "Task success" in out


def test_precomputed_reference(capsys, workdir, tmp_path):
    """--precompute-reference trains against cached log-probs; eval can read them back."""
    store = tmp_path / "store"
    assert (
        main(
            [
                "prepare",
                "--data",
                str(workdir / "prefs.jsonl"),
                "--tokenizer",
                str(workdir / "model"),
                "--out",
                str(store),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    common = ["--max-length", "48", "--json"]
    code, _, err = run(
        capsys,
        "train",
        "--model",
        workdir / "model",
        "--data",
        store,
        "--output-dir",
        tmp_path / "run",
        "--max-length",
        "48",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--precompute-reference",
        "--no-progress",
        "--lr",
        "3e-3",
    )
    assert code == 0, err
    cached_files = {p: p.stat().st_mtime_ns for p in (store / "reference_logps").glob("*.npy")}
    assert cached_files
    # resuming reads the log-probs already stored instead of running the reference again
    code, _, err = run(
        capsys,
        "train",
        "--model",
        workdir / "model",
        "--data",
        store,
        "--output-dir",
        tmp_path / "run",
        "--max-length",
        "48",
        "--batch-size",
        "8",
        "--max-steps",
        "3",
        "--resume-from",
        "latest",
        "--precompute-reference",
        "--no-progress",
        "--lr",
        "3e-3",
    )
    assert code == 0, err
    again = {p: p.stat().st_mtime_ns for p in (store / "reference_logps").glob("*.npy")}
    assert again == cached_files
    final = tmp_path / "run" / "final"
    code, out, err = run(
        capsys, "eval", "--model", final, "--data", store, "--precomputed-reference", *common
    )
    assert code == 0, err
    cached = json.loads(out)
    code, out, _ = run(
        capsys, "eval", "--model", final, "--data", store, "--ref-model", workdir / "model", *common
    )
    live = json.loads(out)
    for key in ("loss", "reward_margin", "chosen_reward", "rejected_reward"):
        assert cached[key] == pytest.approx(live[key], rel=1e-5, abs=1e-6), key
    code, _, err = run(
        capsys,
        "eval",
        "--model",
        final,
        "--data",
        store,
        "--precomputed-reference",
        "--ref-model",
        workdir / "model",
    )
    assert_one_line_error(code, err, 2, "--precomputed-reference")


def test_eval_adapters_against_their_base(capsys, workdir, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--model",
        workdir / "model",
        "--data",
        workdir / "prefs.jsonl",
        "--output-dir",
        run_dir,
        "--lora",
        "--no-merge-lora",
        "--max-steps",
        "3",
        "--batch-size",
        "8",
        "--max-length",
        "48",
        "--lr",
        "2e-2",
        "--no-progress",
    )
    assert code == 0, err
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        run_dir / "final",
        "--data",
        workdir / "prefs.jsonl",
        "--max-length",
        "48",
        "--json",
    )
    assert code == 0, err
    assert "zero reference" not in err
    metrics = json.loads(out)
    assert metrics["reward_margin"] != 0.0
    assert metrics["chosen_logps"] < 0


def test_lora_switches(tmp_path, base_config):
    config_file = toml(tmp_path / "run.toml", **base_config)
    with config_file.open("a") as f:
        f.write("[lora]\nr = 4\nlora_alpha = 16\n")
    assert load_train_config(config_file).lora == {"r": 4, "lora_alpha": 16.0}
    assert load_train_config(config_file, {"lora": True}).lora == {"r": 4, "lora_alpha": 16.0}
    assert load_train_config(config_file, {"lora": False, "lora_r": "2"}).lora is None
    assert load_train_config(config_file, {"lora_r": "2"}).lora == {"r": 2, "lora_alpha": 16.0}
    plain = toml(tmp_path / "plain.toml", **base_config)
    assert load_train_config(plain).lora is None
    assert load_train_config(plain, {"lora": True}).lora == {}
    with config_file.open("a") as f:
        f.write("lora_dropoutt = 0.1\n")
    with pytest.raises(
        UsageError, match=r"unknown key 'lora\.lora_dropoutt'.*'lora\.lora_dropout'"
    ):
        load_train_config(config_file)


def test_train_config_covers_every_fit_option():
    import dataclasses
    import inspect

    from rlox import DPO

    fit = set(inspect.signature(DPO.fit).parameters) - {
        "self",
        "train_dataset",
        "eval_dataset",
        "callback",
    }
    config = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == "fit"}
    assert fit - config <= {"output_dir"}  # output_dir is a run option
    kwargs = TrainConfig(model="m", data="d", output_dir="o").fit_kwargs()
    assert set(kwargs) == fit


def test_report_to_flag_and_config_key(capsys, monkeypatch, tmp_path, base_config):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base_config.items()]
    assert load_train_config(None, base_config).fit_kwargs()["report_to"] is None
    config = load_train_config(None, base_config | {"report_to": "wandb,mlflow"})
    assert config.fit_kwargs()["report_to"] == ("wandb", "mlflow")
    assert load_train_config(None, base_config | {"report_to": "none"}).report_to == "none"
    file = toml(tmp_path / "run.toml", **base_config, report_to=["mlflow"])
    config = load_train_config(file)
    assert config.report_to == "mlflow"
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml())
    assert load_train_config(again) == config
    code, out, _ = run(
        capsys, "train", *flags, "--report-to", "wandb,tensorboard", "--print-config"
    )
    assert code == 0 and 'report_to = ["wandb", "tensorboard"]' in out
    code, _, err = run(capsys, "train", *flags, "--report-to", "neptune")
    assert_one_line_error(code, err, 2, "--report-to: expected a tracker")
    file = toml(tmp_path / "bad.toml", **base_config, report_to="wandb,all")
    code, _, err = run(capsys, "train", "--config", file)
    assert_one_line_error(code, err, 2, "bad.toml: report_to: expected a tracker")
    monkeypatch.setitem(sys.modules, "wandb", None)  # a missing client fails before the model loads
    code, _, err = run(capsys, "train", *flags, "--report-to", "wandb")
    assert_one_line_error(code, err, 1, "report_to: 'wandb' needs the wandb package")
    assert not Path(base_config["output_dir"]).exists()


def test_trl_named_trainer_flags(capsys, base_config):
    """disable_dropout, use_weighting, TR-DPO, router and BCO options reach DPO's keywords."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base_config.items()]
    defaults = load_train_config(None, base_config).dpo_kwargs()
    assert defaults["disable_dropout"] is True and defaults["use_weighting"] is False
    assert (defaults["ref_model_mixup_alpha"], defaults["ref_model_sync_steps"]) == (0.6, 512)
    assert defaults["router_aux_loss_coef"] is None and defaults["bco_running_mean"] is False
    code, out, _ = run(
        capsys,
        "train",
        *flags,
        "--no-disable-dropout",
        "--use-weighting",
        "--sync-ref-model",
        "--ref-model-mixup-alpha=0.3",
        "--ref-model-sync-steps=4",
        "--router-aux-loss-coef=0.02",
        "--bco-running-mean",
        "--print-config",
    )
    assert code == 0
    for line in (
        "disable_dropout = false",
        "use_weighting = true",
        "sync_ref_model = true",
        "ref_model_mixup_alpha = 0.3",
        "ref_model_sync_steps = 4",
        "router_aux_loss_coef = 0.02",
        "bco_running_mean = true",
    ):
        assert line in out, line
    code, _, err = run(capsys, "train", *flags, "--ref-model-mixup-alpha=0")
    assert_one_line_error(code, err, 2, "--ref-model-mixup-alpha: expected a float in (0, 1]")


def test_memory_and_speed_flags(capsys, base_config):
    """attention, logits_chunk_size, gradient_checkpointing, activation_offloading and compile."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in base_config.items()]
    defaults = load_train_config(None, base_config).dpo_kwargs()
    assert defaults["attention"] == "auto" and defaults["logits_chunk_size"] is None
    assert not any(defaults[k] for k in ("gradient_checkpointing", "activation_offloading"))
    assert defaults["compile"] is False
    code, out, _ = run(
        capsys,
        "train",
        *flags,
        "--attention=varlen",
        "--logits-chunk-size=0",
        "--gradient-checkpointing",
        "--activation-offloading",
        "--compile",
        "--print-config",
    )
    assert code == 0
    for line in (
        'attention = "varlen"',
        "logits_chunk_size = 0",
        "gradient_checkpointing = true",
        "activation_offloading = true",
        "compile = true",
    ):
        assert line in out, line
    code, _, err = run(capsys, "train", *flags, "--logits-chunk-size=-2")
    assert_one_line_error(code, err, 2, "--logits-chunk-size", "int >= 0")
