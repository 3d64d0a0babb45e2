"""Crash-safe training checkpoints: ``<output_dir>/checkpoints/step-<N>/``.

A checkpoint directory holds

* ``model.safetensors``: the policy weights (shared tensors stored once);
* ``optimizer.pt``: the optimizer's ``state_dict`` (read back with ``weights_only=True``);
* ``rng.safetensors``: the torch CPU (and CUDA) generator states;
* ``reference.safetensors``: only when TR-DPO (``sync_ref_model``) has moved the reference;
* ``checkpoint.json``: everything else (position in the data order, trainer config, counters,
  scheduler state, Python and numpy generator states, the optimizer's class and its parameter
  groups by parameter name, rlox version);
* ``manifest.json``: written last, the size and CRC-32 of each file above (see
  :mod:`rlox.manifest`). It marks the checkpoint complete.

Checkpoints are written into a hidden temporary directory next to their final place, every file
is fsynced, and the directory is renamed into place, so a crash mid-write leaves the previous
checkpoints intact and never a directory that :func:`latest_checkpoint` would pick. Loading runs
no pickled code, and a file that cannot be read raises ``ValueError`` naming it.

Before loading, a checkpoint is verified against its manifest (:func:`verify_checkpoint`: sizes,
then checksums, in one read that leaves the files in the page cache for the load).
:func:`latest_checkpoint` skips, with a ``UserWarning`` naming it and the reason, every newer
checkpoint that fails verification, including one written before checkpoints had manifests (it
cannot be verified); an explicitly named checkpoint that fails raises ``ValueError``.

Sharded models (FSDP2 ``fully_shard``, whose parameters are DTensors) are saved as full tensors:
every rank takes part in gathering the weights and optimizer state
(``torch.distributed.checkpoint.state_dict`` with ``full_state_dict=True, cpu_offload=True``),
rank 0 writes the same files as for an unsharded model, and loading gives every rank its shards.
The optimizer state of an unsharded model is its ``state_dict()``, keyed by parameter index; that
of a sharded model is keyed by parameter name (fully qualified, as in ``named_parameters()``).
``checkpoint.json`` names the one used (``"optimizer_keys"``: ``"index"`` or ``"name"``) and
loading reads either into either kind of model.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rlox.manifest import MANIFEST, ManifestWriter, manifest_problem
from rlox.optimizers import check_group_sizes, check_optimizer, optimizer_groups
from rlox.train.distributed import (
    all_agree,
    full_tensor,
    is_sharded,
    process_group,
)

__all__ = [
    "CHECKPOINTS",
    "FILES",
    "MANIFEST",
    "MARKER",
    "META",
    "REFERENCE_FILE",
    "capture_rng",
    "full_state",
    "full_tensor",
    "is_sharded",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_optimizer_state",
    "load_weights",
    "optimizer_keys",
    "reading",
    "restore_rng",
    "resume_checkpoint",
    "save_checkpoint",
    "save_weights",
    "verify_checkpoint",
]

CHECKPOINTS = "checkpoints"
META = "checkpoint.json"
MARKER = MANIFEST  # written last: a step directory holding it is complete
FILES = ("model.safetensors", "optimizer.pt", "rng.safetensors", META)
REFERENCE_FILE = "reference.safetensors"
FORMAT = "rlox-checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tied_names(module: nn.Module) -> list[list[str]]:
    """Groups (sorted) of state-dict names that share one tensor, e.g. tied embeddings."""
    names = set(module.state_dict(keep_vars=True))
    groups: dict[int, list[str]] = {}
    named = [*module.named_parameters(remove_duplicate=False)]
    named += module.named_buffers(remove_duplicate=False)
    for name, t in named:
        if name in names:
            groups.setdefault(id(t), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter of ``optimizer``, in the order of its ``state_dict`` indices."""
    names: dict[int, str] = {}
    for name, p in module.named_parameters():
        names.setdefault(id(p), name)
    order = [p for g in optimizer.param_groups for p in g["params"]]
    missing = [i for i, p in enumerate(order) if id(p) not in names]
    if missing:
        raise ValueError(
            f"optimizer: parameter {missing[0]} of the optimizer is not a parameter of the model"
        )
    return [names[id(p)] for p in order]


def optimizer_keys(state: Mapping[str, Any]) -> str:
    """``"name"`` when an optimizer ``state_dict`` is keyed by parameter name, else ``"index"``."""
    keys = list(state.get("state", {})) or [
        p for g in state.get("param_groups", []) for p in g["params"]
    ]
    return "name" if keys and isinstance(keys[0], str) else "index"


def _rekey(state: Mapping[str, Any], mapping: Mapping[Any, Any]) -> dict[str, Any]:
    try:
        return {
            "state": {mapping[k]: v for k, v in state["state"].items()},
            "param_groups": [
                dict(g, params=[mapping[p] for p in g["params"]]) for g in state["param_groups"]
            ],
        }
    except KeyError as e:
        raise ValueError(
            f"optimizer: the saved state names parameter {e} the model lacks"
        ) from None


def full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full weights and optimizer state (keyed by name) of a sharded ``module``, on the CPU.

    A collective: every rank must call it; rank 0 gets the state, the other ranks empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=options)
    optim: dict[str, Any] = {}
    if optimizer is not None:
        if optimizer.state:
            optim = get_optimizer_state_dict(module, optimizer, options=options)
        elif process_group() is None or torch.distributed.get_rank() == 0:
            # Nothing to gather; get_optimizer_state_dict would initialise the state by a step.
            optim = _rekey(optimizer.state_dict(), dict(enumerate(_param_names(module, optimizer))))
    return weights, optim


def save_weights(
    module: nn.Module,
    filename: str | os.PathLike[str],
    weights: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write ``module``'s weights as safetensors, tensors shared under several names stored once.

    ``weights``: the full state dict of a sharded ``module`` (from :func:`full_state`); the file
    is then the one ``safetensors.torch.save_model`` writes for the unsharded model.
    """
    from safetensors.torch import save_file, save_model

    if weights is None:
        save_model(module, str(filename))
        return
    tensors = dict(weights)
    metadata: dict[str, str] = {}
    for group in _tied_names(module):
        for name in group[1:]:
            metadata[name] = group[0]
            tensors.pop(name, None)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(filename), metadata=metadata or None)


def load_weights(module: nn.Module, filename: str | os.PathLike[str]) -> None:
    """Load a file of :func:`save_weights` into ``module`` (strict).

    A sharded ``module`` is a collective: every rank reads the file and keeps its shards.
    """
    from safetensors.torch import load_file, load_model

    if not is_sharded(module):
        load_model(module, str(filename))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights = load_file(str(filename))
    for group in _tied_names(module):
        present = [n for n in group if n in weights]
        for name in group:
            if present and name not in weights:
                weights[name] = weights[present[0]]
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(
    module: nn.Module | None, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> None:
    """Load an optimizer ``state_dict`` keyed by index or by name (see :func:`optimizer_keys`).

    ``module`` is needed to map names to parameters; a sharded ``module`` is a collective: the
    full state is given on every rank and each keeps its shards. Groups of other sizes than the
    optimizer's raise ``ValueError``.
    """
    check_group_sizes(state, optimizer)
    by_name = optimizer_keys(state) == "name"
    if module is None:
        if by_name:
            raise ValueError("model: an optimizer state keyed by name needs the model")
        optimizer.load_state_dict(state)
        return
    if not is_sharded(module) or not state["state"]:
        if by_name:
            names = _param_names(module, optimizer)
            state = _rekey(state, {n: i for i, n in enumerate(names)})
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    if not by_name:
        state = _rekey(state, dict(enumerate(_param_names(module, optimizer))))
    options = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    # set_optimizer_state_dict fails on group options the optimizer lacks (a scheduler's
    # initial_lr), and turns tuples (Adam's betas) into lists: set the saved ones before and after.
    for group, saved in zip(optimizer.param_groups, options, strict=True):
        group.update(saved)
    set_optimizer_state_dict(
        module,
        optimizer,
        dict(state),
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    for group, saved in zip(optimizer.param_groups, options, strict=True):
        group.update(saved)


def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The global generator states: (JSON-able Python/numpy states, torch CPU/CUDA state tensors)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    plain = {
        "python": [version, list(keys), gauss],
        "numpy": [name, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    return plain, tensors


def restore_rng(plain: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Set the global generators to states captured by :func:`capture_rng`."""
    version, keys, gauss = plain["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _step_dirs(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Every ``step-<N>`` directory under ``output_dir/checkpoints``, oldest step first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest step first.

    A directory counts only when it is named ``step-<N>`` and holds its ``manifest.json``
    (written last); temporary directories of an interrupted write are never listed. Listing
    does not verify the files (see :func:`verify_checkpoint`).
    """
    return [p for p in _step_dirs(output_dir) if (p / MARKER).is_file()]


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint with the highest step under ``output_dir`` that verifies, or None.

    Every newer ``step-<N>`` directory that fails :func:`verify_checkpoint` is skipped with a
    ``UserWarning`` naming it and the reason: a damaged or missing file, or no manifest (an
    interrupted write, or a checkpoint written before checkpoints had manifests, which cannot
    be verified).
    """
    for path in reversed(_step_dirs(output_dir)):
        problem = manifest_problem(path, FILES)
        if problem is None:
            return path
        warnings.warn(
            f"resume: skipping checkpoint {path}: {problem}; trying the one before",
            UserWarning,
            stacklevel=2,
        )
    return None


def verify_checkpoint(
    path: str | os.PathLike[str],
    *,
    files: Sequence[str] = FILES,
    field: str = "path",
    module: nn.Module | None = None,
) -> None:
    """Check the directory ``path`` against its manifest; raise ``ValueError`` if it fails.

    ``files`` must be listed in the manifest; every listed file must have the recorded size
    (all checked first) and CRC-32. The message starts with ``field`` and names ``path`` and the
    bad file. With a sharded ``module``, a collective: it fails on every rank if on any.
    """
    path = Path(path)
    problem = manifest_problem(path, files) if path.is_dir() else "no such directory"
    if module is not None and is_sharded(module):
        if not all_agree(problem is not None, module) and problem is None:
            problem = "verification failed on another rank"
    if problem is not None:
        raise ValueError(f"{field}: {path}: {problem}")


def resume_checkpoint(
    resume_from: str | os.PathLike[str] | None,
    output_dir: str | os.PathLike[str] | None,
    module: nn.Module,
) -> Path | None:
    """The verified checkpoint that ``fit(resume_from=...)`` resumes from; None: start fresh.

    ``"latest"``: :func:`latest_checkpoint` of ``output_dir`` (warning about each newer one it
    skips); a directory: that one, which must verify (else ``ValueError``). Under
    ``torch.distributed`` (and ``resume_from`` given), a collective: rank 0 verifies and decides,
    every rank gets its choice or raises its error, so all ranks load the same checkpoint.
    """
    if resume_from is None:
        return None
    dist = process_group()
    choice: Path | None = None
    error: ValueError | None = None
    if dist is None or dist.get_rank() == 0:
        try:
            if resume_from == "latest":
                assert output_dir is not None
                choice = latest_checkpoint(output_dir)
            else:
                verify_checkpoint(resume_from, field="resume_from")
                choice = Path(resume_from)
        except ValueError as e:
            if dist is None:
                raise
            error = e
    if dist is None:
        return choice
    p = next(iter(module.parameters()), None)
    message = [None if choice is None else str(choice), None if error is None else str(error)]
    dist.broadcast_object_list(message, src=0, device=None if p is None else p.device)
    if error is not None:
        raise error
    if message[1] is not None:
        raise ValueError(message[1])
    return None if message[0] is None else Path(message[0])


@contextlib.contextmanager
def reading(path: Path, name: str, field: str = "path") -> Iterator[None]:
    """Raise what loading ``path/name`` raises (safetensors, ``torch.load``, json, OS errors) as
    ``ValueError`` naming ``field``, the directory and the file; the original is its cause."""
    try:
        yield
    except Exception as e:
        raise ValueError(f"{field}: {path}: cannot load {name} ({type(e).__name__}: {e})") from e


def save_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    keep: int | None = None,
    collective: bool | None = None,
    reference: nn.Module | None = None,
) -> Path | None:
    """Atomically write ``output_dir/checkpoints/step-<step>/``; return its path.

    ``state`` is any JSON-able mapping (stored in ``checkpoint.json`` with the generator states,
    the optimizer's class and its groups of :func:`optimizer_groups`). ``manifest.json`` is written
    last. An existing checkpoint of the same step is replaced, and step directories of later steps
    (left by the run that a resumed run branched off from, or damaged) are removed, so the highest
    step is always the newest state. With ``keep``, only the ``keep`` newest complete checkpoints
    are kept afterwards. ``reference``: a reference model that training has moved (TR-DPO),
    written as ``reference.safetensors``.

    ``collective`` (always so for a sharded ``model``): every rank of the initialised process
    group calls this; the full state is gathered, rank 0 alone writes and the ranks wait for it.
    A failed write then raises on every rank, and the other ranks return None.
    """
    sharded = is_sharded(model)
    dist = process_group()
    collective = dist is not None and (sharded or bool(collective))
    writer = not collective or dist.get_rank() == 0
    weights: dict[str, torch.Tensor] | None = None
    optim: Mapping[str, Any] = {}
    if sharded:
        weights, optim = full_state(model, optimizer)
    elif writer:
        optim = optimizer.state_dict()
    ref_weights = None
    if reference is not None and is_sharded(reference):
        ref_weights, _ = full_state(reference, None)
    final: Path | None = None
    error: Exception | None = None
    if writer:
        try:
            state = {
                **state,
                "optimizer": type(optimizer).__name__,
                "optimizer_groups": optimizer_groups(model, optimizer),
            }
            ref = None if reference is None else (reference, ref_weights)
            final = _write_checkpoint(output_dir, step, model, weights, optim, state, ref)
            later = [p for p in _step_dirs(output_dir) if _step_of(p) > step]
            found = [p for p in list_checkpoints(output_dir) if _step_of(p) <= step]
            stale = found[:-keep] if keep is not None and keep > 0 else []
            for path in [*later, *stale]:
                # Renamed away first, so a kill mid-removal leaves no half-deleted step directory.
                gone = path.with_name(f"{_TMP_PREFIX}old-{path.name}-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(path, gone)
                except OSError:
                    gone = path
                shutil.rmtree(gone, ignore_errors=True)
        except Exception as e:
            if not collective:
                raise
            error = e
    if collective and not all_agree(error is not None, model):
        if error is not None:
            raise error
        raise RuntimeError(f"checkpoint: rank 0 failed to write step-{step} (see its error)")
    return final


def _write_checkpoint(
    output_dir: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    weights: Mapping[str, torch.Tensor] | None,
    optim: Mapping[str, Any],
    state: Mapping[str, Any],
    reference: tuple[nn.Module, Mapping[str, torch.Tensor] | None] | None = None,
) -> Path:
    from safetensors.torch import save_file

    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f"{_TMP_PREFIX}step-{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    manifest = ManifestWriter(tmp)
    try:
        # Each file's checksum is taken as soon as it is written, from the page cache.
        save_weights(model, tmp / "model.safetensors", weights)
        manifest.add("model.safetensors")
        with open(tmp / "optimizer.pt", "wb") as f:
            torch.save(optim, f)
        manifest.add("optimizer.pt")
        plain_rng, tensor_rng = capture_rng()
        save_file({k: v.contiguous() for k, v in tensor_rng.items()}, str(tmp / "rng.safetensors"))
        manifest.add("rng.safetensors")
        if reference is not None:
            save_weights(reference[0], tmp / REFERENCE_FILE, reference[1])
            manifest.add(REFERENCE_FILE)
        meta = {
            "format": FORMAT,
            "step": int(step),
            "rng": plain_rng,
            "optimizer_keys": optimizer_keys(optim),
            **state,
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, allow_nan=True))
        manifest.add(META)
        manifest.write()  # last: marks the checkpoint complete
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        old = None
        if final.exists():
            old = root / f"{_TMP_PREFIX}old-{step}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def remove_partial(output_dir: str | os.PathLike[str]) -> None:
    """Delete temporary directories left by interrupted checkpoint writes."""
    root = Path(output_dir) / CHECKPOINTS
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    rng: bool = True,
    verify: bool = True,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; return its ``checkpoint.json``.

    Loads the weights into ``model`` and the state into ``optimizer`` when given, and restores
    the global generators when ``rng``, and the saved moved reference into ``reference`` when
    the checkpoint has one. No pickled code is run. With a sharded ``model`` every
    rank must call it: each reads the full state and keeps its shards.

    ``verify``: first check the files against the manifest (:func:`verify_checkpoint`; pass False
    only for a checkpoint just verified). A checkpoint that fails, a file that cannot be read, or
    an ``optimizer`` whose class or parameter groups differ from the saved one raises
    ``ValueError`` naming the checkpoint and the file, or the difference.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if verify:
        verify_checkpoint(path, field="resume_from", module=model)
    elif not (path / META).is_file():
        raise ValueError(f"resume_from: {path} is not a complete rlox checkpoint ({META} missing)")
    with reading(path, META, "resume_from"):
        meta = json.loads((path / META).read_bytes())
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"resume_from: {path / META} is not an rlox checkpoint")
    if optimizer is not None and "optimizer_groups" in meta:
        check_optimizer(model, optimizer, meta.get("optimizer"), meta["optimizer_groups"])
    if model is not None:
        with reading(path, "model.safetensors", "resume_from"):
            load_weights(model, path / "model.safetensors")
    if optimizer is not None:
        with reading(path, "optimizer.pt", "resume_from"):
            optim = torch.load(path / "optimizer.pt", weights_only=True)
        load_optimizer_state(model, optimizer, optim)
    if reference is not None and (path / REFERENCE_FILE).is_file():
        with reading(path, REFERENCE_FILE, "resume_from"):
            load_weights(reference, path / REFERENCE_FILE)
    if rng:
        with reading(path, "rng.safetensors", "resume_from"):
            restore_rng(meta["rng"], load_file(str(path / "rng.safetensors")))
    return meta
