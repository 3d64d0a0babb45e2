"""What the route probe picks for every decoder of the installed transformers, and what it costs.

For each architecture of ``tests/zoo.py`` (tiny configs, float64 where the kernels allow it, else
float32), on sdpa and on eager attention, prints the route ``attention="auto"`` verified for each
layout (``+head``: the LM head runs at the plan's points with the model's logit transform;
``full``: the model's own forward) and the probe's cost, paid once per model and layout. Then
times the probe on a bigger Llama (the ``bench_train.py`` default: hidden 256, 4 layers, vocab
32k, float32) against one training forward + backward of an 8-pair batch of 512-token rows.

    .venv/bin/python benches/bench_probe.py [--markdown]
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import zoo  # noqa: E402

from rlox import DPO, PreferenceDataset  # noqa: E402
from rlox.train import probe  # noqa: E402
from rlox.train.logps import accepted_kwargs, resolve_route  # noqa: E402

LAYOUTS = ("padded", "packed", "prefix_shared")


def _why(err: Exception) -> str:
    """A refusal in a few words."""
    text = str(err)
    if "recurrent layers" in text:
        return "recurrent state"
    diffs = [
        float(m) for m in re.findall(r"differ from the model's own forward by ([0-9.e+-]+)", text)
    ]
    if diffs:
        return f"differs by {min(diffs):.0e}"
    return "error: " + (re.findall(r"\): (\w+Error)", text) or ["?"])[0]


def _routes(model: torch.nn.Module) -> tuple[list[str], list[float]]:
    accepted = accepted_kwargs(model)
    names, costs = [], []
    for layout in LAYOUTS:
        model.__dict__.pop(probe._CACHE, None)
        start = time.perf_counter()
        try:
            route = resolve_route(model, layout, accepted)
            names.append(f"{route.attention}{'' if route.split else ' (full)'}")
        except (TypeError, ValueError) as err:
            names.append(f"refused: {_why(err)}")
        costs.append((time.perf_counter() - start) * 1e3)
    return names, costs


def zoo_table(markdown: bool) -> None:
    """One row per architecture: its routes on sdpa (eager where it has no sdpa), and where
    they differ, its routes on eager attention."""
    rows, all_costs = [], []
    for name in zoo.ARCHITECTURES:
        dtype = torch.float32 if name in zoo.FLOAT32_ONLY else torch.float64
        found = {}
        for impl in ("sdpa", "eager"):
            if impl == "sdpa" and name in zoo.NO_SDPA:
                continue
            model = copy.deepcopy(zoo.cached(name, dtype, impl))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found[impl], costs = _routes(model)
            all_costs += costs
        first = next(iter(found))
        eager = found.get("eager")
        note = ""
        if first == "sdpa" and eager != found["sdpa"]:
            note = "eager: " + ", ".join(eager)
        elif first == "eager":
            note = "eager only"
        rows.append((name, str(dtype).removeprefix("torch."), *found[first], note))
    head = ("model_type", "dtype", *LAYOUTS, "note")
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(map(str, r)) + " |")
    else:
        print(" ".join(f"{h:>22}" for h in head))
        for r in rows:
            print(" ".join(f"{str(v):>22}" for v in r))
    costs = sorted(all_costs)
    print(
        f"\nprobe per model and layout: median {costs[len(costs) // 2]:.0f} ms, "
        f"max {costs[-1]:.0f} ms over {len(costs)} probes"
    )


def big_llama() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(0, 32000, (n,), generator=g).tolist()

    data = PreferenceDataset.from_lists(
        [ids(100) for _ in range(8)], [ids(150) for _ in range(8)], [ids(150) for _ in range(8)]
    )
    for layout in LAYOUTS:
        model.__dict__.pop(probe._CACHE, None)
        start = time.perf_counter()
        resolve_route(model, layout, accepted_kwargs(model))
        cost = (time.perf_counter() - start) * 1e3
        trainer = DPO(model, copy.deepcopy(model))
        trainer.check_layout(layout)
        batch = data.collate(range(8), layout=layout, max_length=None)
        trainer.train_step(batch)  # warm-up
        start = time.perf_counter()
        trainer.train_step(batch)
        step = (time.perf_counter() - start) * 1e3
        print(
            f"Llama h256 x4 V32k float32, {layout:>13}: probe {cost:6.0f} ms once, "
            f"one train_step (8 pairs, {batch.input_ids.numel()} tokens) {step:6.0f} ms, "
            f"ratio {cost / step:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the zoo as a table")
    parser.add_argument("--zoo-only", action="store_true", help="skip the bigger Llama")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads) | transformers "
        f"{transformers.__version__} | CPU"
    )
    zoo_table(args.markdown)
    if not args.zoo_only:
        big_llama()


if __name__ == "__main__":
    main()
