"""Distributed checkpoints for DistMuon: DCP save, validated load (resharding), crash-safe "latest".

Layout of a checkpoint root::

    ckpt_dir/
      step-3/              complete: renamed from step-3.tmp after dcp.save returned on every rank
        .metadata          DCP metadata
        __0_0.distcp ...   DCP data, one file per writing rank
        COMPLETE.json      manifest: step, world size, the size (and, opt-in, sha256) of every file above
      step-6.tmp/          being written (or interrupted): never considered by ``latest_checkpoint``

The step-N directories and "latest" are for training loops of your own; torchtitan's
CheckpointManager has its own layout and logic (docs/checkpointing.md).

The state is saved with the standard ``torch.distributed.checkpoint.state_dict`` helpers, keyed
by FQN, with the optimizer state flattened (``flatten_optimizer_state_dict=True``, as torchtitan
does), so a checkpoint written at one world size / layout loads at another (FSDP 4 → 2, FSDP →
HSDP, 4 → 1, 1 → 2 ...): DCP reshards every DTensor to the loading side's placements.

Loading validates *before any tensor is written*, from DCP's ``.metadata`` and the small
param-group entries only: every parameter's optimizer state must be in the checkpoint with the same
keys (so a parameter routed to a different algorithm, e.g. "muon" then and "adamw" now, is an error
naming it), the same global shapes, the same ``algorithm`` and view options, and the same param
group (the same ``param_names`` beside it). Other hyperparameters follow ``torch.optim`` semantics:
the checkpoint's param-group values win over the constructor's (so LR schedulers resume where they
were).

A checkpoint routed otherwise (an AdamW run, DistMuon with other rules) loads when asked:
``load_checkpoint(..., on_routing_change="reset" | "convert")``, a warm start (``warm_start.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .routing import VIEW_KEYS

MARKER = "COMPLETE.json"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")

# State keys per algorithm, to name the routing a checkpoint was written with.
STATE_KEYS = {
    "muon": ("momentum_buffer",),
    "adamw": ("step", "exp_avg", "exp_avg_sq"),
    "muown": ("momentum_buffer", "step", "magnitude", "direction_norm", "magnitude_exp_avg", "magnitude_exp_avg_sq"),
    "normuon": ("momentum_buffer", "second_moment"),
    "muon+adamw blocks": ("momentum_buffer", "step", "exp_avg", "exp_avg_sq"),
}
# Param-group keys that change what the optimizer *is* for a parameter, not a tunable value:
# they must agree between the checkpoint and the running optimizer.
STRUCTURAL_GROUP_KEYS = ("algorithm",) + tuple(VIEW_KEYS)
# How much of the files ``verify_files`` reads: the manifest and file sizes (O(metadata)), or every byte.
VERIFY_MODES = ("sizes", "sha256", "none")


ROUTED = "routed to"  # how a routing mismatch is worded (routing_hint recognises it)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: incomplete, corrupt, or not matching the model/optimizer."""


# ----------------------------------------------------------------------------- state dicts


def optim_options() -> StateDictOptions:
    return StateDictOptions(flatten_optimizer_state_dict=True)


def training_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": FQN → tensor, "optim": flattened FQN-keyed optimizer state} (tensors alias the live ones)."""
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer, options=optim_options()),
    }


def algorithm_of_keys(keys) -> Optional[str]:
    keys = set(keys)
    for name, expected in STATE_KEYS.items():
        if keys == set(expected):
            return name
    return None


# ----------------------------------------------------------------------------- finding checkpoints


def step_path(root: str, step: int) -> str:
    return os.path.join(root, f"step-{int(step)}")


def is_complete(path: str) -> bool:
    """A checkpoint is complete when its final name exists with DCP metadata and the completion manifest."""
    return (
        _STEP_DIR.match(os.path.basename(os.path.normpath(path))) is not None
        and os.path.isfile(os.path.join(path, ".metadata"))
        and os.path.isfile(os.path.join(path, MARKER))
    )


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under ``root``, oldest first; ``*.tmp`` never counts."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if m and is_complete(path):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_checkpoint(root: str) -> Optional[str]:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------- helpers


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _data_files(path: str) -> list[str]:
    return sorted(f for f in os.listdir(path) if f != MARKER and os.path.isfile(os.path.join(path, f)))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_files(path: str, files: Sequence[str]) -> dict[str, str]:
    """sha256 of every file; each rank hashes its share, everyone gets the whole table. Collective."""
    rank, world = _rank(), _world()
    mine = {f: _sha256(os.path.join(path, f)) for i, f in enumerate(files) if i % world == rank}
    if not _dist():
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _check_verify(verify: str) -> None:
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: expected one of {VERIFY_MODES} ('sizes' reads only the manifest and "
                         "file sizes; 'sha256' also reads every byte; 'none' skips the file checks)")


def _everyone(problems: list[str]) -> list[str]:
    """Every rank's problems, on every rank (the same list everywhere; collective)."""
    if not _dist():
        return problems
    parts: list = [None] * _world()
    dist.all_gather_object(parts, problems)
    return list(dict.fromkeys(p for part in parts for p in part))


def _agree(ok: bool, message: str) -> None:
    """Raise CheckpointError on every rank if any rank failed (no rank is left waiting in a collective)."""
    if _dist():
        messages: list = [None] * _world()
        dist.all_gather_object(messages, None if ok else message)
        bad = [(r, m) for r, m in enumerate(messages) if m is not None]
        if bad:
            raise CheckpointError(bad[0][1] if len(bad) == 1 or all(m == bad[0][1] for _, m in bad)
                                  else "; ".join(f"rank {r}: {m}" for r, m in bad))
    elif not ok:
        raise CheckpointError(message)


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    root: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lr_schedulers: Sequence[Any] = (),
    extra: Optional[dict] = None,
    keep_last: Optional[int] = None,
    on_written: Optional[Callable[[str], None]] = None,
    checksums: bool = False,
) -> str:
    """Save model + optimizer (+ LR schedulers, + picklable ``extra``) as ``root/step-N``; collective.

    Written to ``step-N.tmp``; after ``dcp.save`` returned on every rank, the file list and sizes
    (and with ``checksums=True`` the sha256 of every file, which reads the whole checkpoint back) go
    into the ``COMPLETE.json`` manifest and the directory is renamed atomically to ``step-N``. A
    crash at any point before the rename leaves only a ``.tmp`` directory, which resume ignores.
    ``keep_last`` deletes older complete checkpoints, keeping that many. ``on_written(tmp_path)`` runs
    on every rank after its ``dcp.save`` returned and before the commit (a hook for fault injection).
    """
    final = step_path(root, step)
    tmp = final + ".tmp"
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # left over from an interrupted attempt
    _barrier()
    state = training_state_dict(model, optimizer)
    state["lr_schedulers"] = [s.state_dict() for s in lr_schedulers]
    state["train_state"] = {"step": int(step), "world_size": _world(), "extra": extra or {}}
    dcp.save(state, checkpoint_id=tmp)
    if on_written is not None:
        on_written(tmp)
    _barrier()  # dcp.save returned on every rank (its own finish step already synchronised metadata)
    files = _data_files(tmp) if checksums or _rank() == 0 else []  # rank 0 renames tmp once it is done with it
    hashes = _hash_files(tmp, files) if checksums else {}
    if _rank() == 0:
        manifest = {
            "format": FORMAT_VERSION,
            "step": int(step),
            "world_size": _world(),
            "torch": torch.__version__,
            "files": {f: {"bytes": os.path.getsize(os.path.join(tmp, f)),
                          **({"sha256": hashes[f]} if checksums else {})} for f in files},
        }
        marker_tmp = os.path.join(tmp, MARKER + ".partial")
        with open(marker_tmp, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker_tmp, os.path.join(tmp, MARKER))
        if os.path.exists(final):
            shutil.rmtree(final)  # an older checkpoint for the same step: the new one replaces it
        os.replace(tmp, final)
        _fsync_dir(root)
        if keep_last:
            for _, old in complete_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- validate

# A checkpoint as validation sees it: every key with its global shape (None: not a tensor), and a
# reader that fills a request {key: target} in place (tensors are written into, other values replaced).
Shapes = dict[str, Optional[tuple]]
Reader = Callable[[dict], None]


def dcp_shapes(path: str) -> Shapes:
    """Every key of a DCP checkpoint with its global shape (None for non-tensor entries); reads ``.metadata`` only."""
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {k: tuple(md.size) if isinstance(md, TensorStorageMetadata) else None for k, md in metadata.items()}


def dcp_reader(path: str) -> Reader:
    return lambda request: dcp.load(request, checkpoint_id=path)


def verify_files(path: str, verify: str = "sizes") -> dict:
    """Check the checkpoint is complete and its files match the manifest; collective. Returns the manifest.

    ``"sizes"`` (default) reads the commit marker, the file list and sizes: O(metadata), catches
    interrupted, missing and truncated files. ``"sha256"`` also hashes every byte against the
    checksums written by ``save_checkpoint(..., checksums=True)``: it catches silent corruption at
    the cost of reading the whole checkpoint. ``"none"`` skips the checks.
    """
    _check_verify(verify)
    if verify == "none":
        return {}
    ok, message, manifest = True, "", {}
    if not os.path.isdir(path):
        ok, message = False, f"checkpoint {path} does not exist"
    elif not os.path.isfile(os.path.join(path, ".metadata")):
        ok, message = False, f"checkpoint {path} is incomplete: no DCP .metadata file (interrupted while being written?)"
    elif not os.path.isfile(os.path.join(path, MARKER)):
        ok, message = False, (f"checkpoint {path} is incomplete: no {MARKER} completion marker "
                              "(dcp.save did not finish on every rank)")
    else:
        try:
            with open(os.path.join(path, MARKER)) as f:
                manifest = json.load(f)
            files = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ok, message = False, f"checkpoint {path}: unreadable {MARKER}: {e}"
        else:
            present = set(_data_files(path))
            missing = sorted(set(files) - present)
            unhashed = sorted(f for f, info in files.items() if "sha256" not in info)
            if missing:
                ok, message = False, f"checkpoint {path} is missing files {missing}"
            elif verify == "sha256" and unhashed:
                ok, message = False, (f"checkpoint {path} was saved without checksums, so verify='sha256' cannot "
                                      "check it: load it with verify='sizes', or save with checksums=True")
            else:
                for f, info in files.items():
                    size = os.path.getsize(os.path.join(path, f))
                    if size != info["bytes"]:
                        ok, message = False, f"checkpoint {path}: {f} has {size} bytes, the manifest says {info['bytes']} (truncated or corrupt)"
                        break
    _agree(ok, message)
    if verify == "sha256":
        actual = _hash_files(path, sorted(manifest["files"]))
        bad = sorted(f for f, info in manifest["files"].items() if actual[f] != info["sha256"])
        _agree(not bad, f"checkpoint {path} is corrupt: checksum mismatch in {bad}")
    return manifest


def _group_checks(read: Reader, optim_sd: dict, prefix: str, saved_keys, moved=frozenset()) -> list[str]:
    """Compare each parameter's structural param-group values (algorithm, view options, the names of
    the parameters sharing its group) with the checkpoint's (``saved_keys``: its keys; ``read`` fills
    a request of them in place).

    ``moved``: parameters whose algorithm changed, accepted by a warm start (``dist_muon.warm_start``).
    They are not compared, and the group comparison leaves them out on both sides: a parameter that
    moved to another algorithm necessarily left its group.

    Reads only these small non-tensor entries; nothing in the optimizer is touched. The group check
    matters because ``set_optimizer_state_dict`` takes a group's values from its first parameter's
    entries: regrouped parameters would load other parameters' hyperparameters, or fail
    ``DistMuon.load_state_dict`` after DCP had already written the tensors.
    """
    keys = ("param_names",) + STRUCTURAL_GROUP_KEYS

    def structural(key: str) -> bool:
        return key.startswith("param_groups.") and key.rsplit(".", 1)[1] in keys

    def fqn_of(key: str) -> str:
        return key[len("param_groups."):].rsplit(".", 1)[0]

    mine = {fqn_of(k) for k in optim_sd if k.startswith("param_groups.")} - set(moved)
    saved = {k[len(prefix):] for k in saved_keys if k.startswith(prefix) and structural(k[len(prefix):])}
    # Entries the checkpoint has, of our parameters: torchtitan 0.3.0 saves no param_names, and a
    # checkpoint older than a view key (interleave) lacks it (loaders fill it from the live group).
    # A view key the checkpoint has and our group lacks (interleave is kept only when set) is unset now.
    compared = sorted(k for k in saved if fqn_of(k) in mine and (k in optim_sd or k.rsplit(".", 1)[1] in VIEW_KEYS))
    if not compared:
        return []
    probe = {prefix + k: None for k in compared}
    read(probe)
    problems = []
    for key in compared:
        fqn, option = key[len("param_groups."):].rsplit(".", 1)
        theirs, ours = probe[prefix + key], optim_sd.get(key)
        if option == "param_names" and moved:
            theirs, ours = _without(theirs, moved), _without(ours, moved)
        if _normal(theirs) == _normal(ours):
            continue
        if option == "algorithm":
            problems.append(f"{fqn}: {ROUTED} {theirs!r} in the checkpoint but to {ours!r} now")
        elif option == "param_names" and _stage_of(_normal(ours), _normal(theirs), mine):
            continue
        elif option == "param_names":
            problems.append(f"{fqn}: its param group holds {list(theirs)} in the checkpoint but {list(ours)} now "
                            "(build the param groups with the rules used when saving)")
        else:
            problems.append(f"{fqn}: view option {option}={theirs!r} in the checkpoint but {ours!r} now")
    return problems


def _without(names, moved) -> Optional[list]:
    return None if names is None else [n for n in names if n not in moved]


def _stage_of(ours, theirs, mine) -> bool:
    """Whether a live group is a pipeline stage's part of one saved group: its members are all in the
    saved group, and the saved group's other members belong to no group of this optimizer (another
    stage's). Then it takes that group's values; members regrouped within one optimizer do not."""
    return set(ours) <= set(theirs) and not (set(theirs) - set(ours)) & set(mine)


def _normal(v):
    if isinstance(v, (list, tuple)):
        return tuple(_normal(x) for x in v)
    return v


def checkpoint_problems(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    model_prefix: str = "model.",
    optim_prefix: str = "optim.",
    exclusive: bool = True,
    current: Optional[dict[str, Any]] = None,
) -> list[str]:
    """Why ``path`` cannot be loaded into model + optimizer exactly (empty: it can); collective.

    Reads DCP's ``.metadata`` (every key with its global shape) and the param-group entries named in
    ``_group_checks``; no tensor is read and nothing is written. Keys are ``model_prefix + FQN`` and
    ``optim_prefix + <flattened optimizer key>``: ``"model."``/``"optim."`` for ``save_checkpoint``,
    ``""``/``"optimizer."`` for torchtitan's checkpoints. ``exclusive=False`` allows optimizer state
    of parameters this optimizer lacks (a pipeline stage loading a checkpoint of all stages).
    ``current``: the live {"model": ..., "optim": ...} as the saver flattened it (default: torch's
    ``training_state_dict``; torchtitan 0.3.0 flattens the optimizer its own way).
    """
    current = training_state_dict(model, optimizer) if current is None else current
    try:
        shapes = dcp_shapes(path)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata is a corrupt checkpoint
        return _everyone([f"cannot read DCP metadata ({type(e).__name__}: {e})"])
    problems, _ = problems_and_moves(shapes, dcp_reader(path), current, model_prefix=model_prefix,
                                     optim_prefix=optim_prefix, exclusive=exclusive)
    return problems


def problems_and_moves(shapes: Shapes, read: Reader, current: dict[str, Any], *, model_prefix: str,
                       optim_prefix: str, exclusive: bool, allow_moves: bool = False
                       ) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """(problems, moves); collective. ``moves``: FQN -> (algorithm in the checkpoint, algorithm now)
    for every parameter whose state is another known algorithm's; they are problems unless
    ``allow_moves`` (a warm start, ``dist_muon.warm_start``), and then left out of the group checks.
    The same lists on every rank."""
    moves: dict[str, tuple[str, str]] = {}
    problems = _key_problems(shapes, current, model_prefix, optim_prefix, exclusive,
                             moves if allow_moves else None)
    problems = _everyone(problems)  # before the collective read in _group_checks: all ranks or none
    if problems:
        return problems, moves
    return _everyone(_group_checks(read, current["optim"], optim_prefix, shapes.keys(), frozenset(moves))), moves


def validate_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        verify: str = "sizes", lr_schedulers: Optional[Sequence[Any]] = None) -> dict:
    """Raise CheckpointError (on every rank) unless ``path`` can be loaded into model + optimizer exactly.

    Checks: completeness and files (``verify``, see ``verify_files``), every model / optimizer key
    present with the same global shape, per-parameter optimizer state keys equal (routing),
    structural param-group options and groups equal, no optimizer state for parameters the model
    does not have, and (when given) as many LR schedulers as saved. Returns the manifest.
    """
    manifest = verify_files(path, verify)
    problems = checkpoint_problems(path, model, optimizer)
    _agree(not problems, _format(path, problems))
    if lr_schedulers is not None:
        _check_schedulers(path, lr_schedulers)
    return manifest


def _check_schedulers(path: str, lr_schedulers: Sequence[Any]) -> None:
    metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    saved = len({k.split(".")[1] for k in metadata if k.startswith("lr_schedulers.")})
    _agree(saved == len(lr_schedulers), _format(path, [f"{saved} LR schedulers were saved, "
                                                         f"{len(lr_schedulers)} were given"]))


def _format(path: str, problems: list[str], hint: str = "load_checkpoint(..., on_routing_change='reset' or "
            "'convert')") -> str:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    return (f"checkpoint {path} does not match this model/optimizer:\n  " + "\n  ".join(shown)
            + routing_hint(problems, hint))


def routing_hint(problems: Sequence[str], how: str) -> str:
    """A line saying how to load anyway, when some problem is a parameter routed to another algorithm."""
    if not any(ROUTED in p for p in problems):
        return ""
    return (f"\n(parameters routed to another algorithm load with {how}: a warm start, "
            "docs/checkpointing.md#warm-starts)")


def _shape(t) -> tuple:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else ()


def _key_problems(shapes: Shapes, current: dict, model_prefix: str, optim_prefix: str, exclusive: bool,
                  moves: Optional[dict] = None) -> list[str]:
    """Missing keys and other shapes; a parameter routed to another algorithm goes into ``moves``
    when it is a dict (a warm start), else it is a problem."""
    problems = []
    # model
    for fqn, t in current["model"].items():
        key = model_prefix + fqn
        if key not in shapes:
            problems.append(f"{fqn}: parameter missing from the checkpoint")
        elif isinstance(t, torch.Tensor) and shapes[key] is not None and shapes[key] != _shape(t):
            problems.append(f"{fqn}: shape {shapes[key]} in the checkpoint but {_shape(t)} now")
    # optimizer state, per parameter
    ours: dict[str, dict[str, Any]] = {}
    for key, value in current["optim"].items():
        if key.startswith("state."):
            fqn, k = key[len("state."):].rsplit(".", 1)
            ours.setdefault(fqn, {})[k] = value
    theirs: dict[str, dict[str, Any]] = {}
    state_prefix = optim_prefix + "state."
    for key, shape in shapes.items():
        if key.startswith(state_prefix):
            fqn, k = key[len(state_prefix):].rsplit(".", 1)
            theirs.setdefault(fqn, {})[k] = shape
    for fqn, state in ours.items():
        saved = theirs.get(fqn)
        if saved is None:
            problems.append(f"{fqn}: no optimizer state in the checkpoint (expected {sorted(state)})")
            continue
        if set(saved) != set(state):
            then, now = algorithm_of_keys(saved), algorithm_of_keys(state)
            if then and now and then != now and moves is not None:
                moves[fqn] = (then, now)
            elif then and now and then != now:
                problems.append(f"{fqn}: {ROUTED} {then!r} in the checkpoint (state {sorted(saved)}) but to {now!r} "
                                f"now (state {sorted(state)})")
            else:
                missing, extra = sorted(set(state) - set(saved)), sorted(set(saved) - set(state))
                problems.append(f"{fqn}: optimizer state keys differ: missing from the checkpoint {missing}, "
                                f"unexpected in the checkpoint {extra}")
            continue
        for k, value in state.items():
            shape = saved[k]
            if isinstance(value, torch.Tensor) and shape is not None and shape != _shape(value):
                problems.append(f"{fqn}: optimizer state {k!r} has shape {shape} in the checkpoint but "
                                f"{_shape(value)} now")
    for fqn in sorted(set(theirs) - set(ours)) if exclusive else ():
        problems.append(f"{fqn}: the checkpoint has optimizer state for it but the optimizer has no such parameter")
    return problems


# ----------------------------------------------------------------------------- load


def load_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lr_schedulers: Sequence[Any] = (),
    verify: str = "sizes",
    on_routing_change: str = "refuse",
    log: Optional[Callable[[str], None]] = print,
) -> dict:
    """Validate, then load model + optimizer (+ LR schedulers) from ``path``, resharding as needed; collective.

    Returns the ``train_state`` dict saved with it (``step``, ``world_size``, ``extra``). Load the
    schedulers here (after the optimizer) rather than constructing them afterwards. ``verify``: how
    the files are checked first (``"sizes"``, ``"sha256"`` or ``"none"``, see ``verify_files``).

    ``on_routing_change``: what happens to a parameter whose optimizer state in the checkpoint is
    another algorithm's (a ``torch.optim.AdamW`` checkpoint, a DistMuon run routed differently):
    ``"refuse"`` (default) raises, naming it and both algorithms; ``"reset"`` gives it fresh state;
    ``"convert"`` carries its momentum over (``dist_muon.warm_start`` has the rules). Then the
    returned dict also has ``"warm_start"``, a ``WarmStartReport`` of what every parameter got,
    which ``log`` (rank 0; None: silent) prints too.
    """
    from . import warm_start

    warm_start.check_mode(on_routing_change)
    if on_routing_change != "refuse":
        verify_files(path, verify)
        plan = warm_start.plan_warm_start(warm_start.dcp_source(path), model, optimizer, mode=on_routing_change)
        _agree(not plan.problems, _format(path, list(plan.problems)))
        _check_schedulers(path, lr_schedulers)
        if warm_start.any_rank(bool(plan.moves)):
            return warm_start.load_checkpoint_with_moves(path, plan, model, optimizer, lr_schedulers=lr_schedulers,
                                                         log=log)
        verify = "none"  # nothing moved: an ordinary load, the files already checked
    validate_checkpoint(path, model, optimizer, verify=verify, lr_schedulers=lr_schedulers)
    state = training_state_dict(model, optimizer)  # aliases the live tensors: dcp.load writes in place
    state["lr_schedulers"] = [s.state_dict() for s in lr_schedulers]
    state["train_state"] = {"step": 0, "world_size": 0, "extra": {}}
    # Param-group keys the checkpoint predates (a group key kept only when set, such as interleave or
    # state_dtype) keep their live values: DCP refuses to load a key the checkpoint lacks.
    saved_keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata.keys()
    predated = {k: v for k, v in state["optim"].items() if k.startswith("param_groups.") and "optim." + k not in saved_keys}
    for key in predated:
        del state["optim"][key]
    ok, message = True, ""
    try:
        dcp.load(state, checkpoint_id=path)
    except Exception as e:  # noqa: BLE001 - re-raised below with the path, on every rank
        ok, message = False, f"checkpoint {path}: DCP load failed ({type(e).__name__}: {e})"
    _agree(ok, message)
    state["optim"].update(predated)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"], options=optim_options())
    for scheduler, sd in zip(lr_schedulers, state["lr_schedulers"]):
        scheduler.load_state_dict(sd)
    return state["train_state"]


def resume(
    root: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    lr_schedulers: Sequence[Any] = (),
    verify: str = "sizes",
    on_routing_change: str = "refuse",
) -> int:
    """Load the latest complete checkpoint under ``root``; returns its step (0 when there is none).

    Every rank must see the same latest checkpoint (a shared filesystem); ranks that disagree raise.
    ``on_routing_change``: as in ``load_checkpoint``.
    """
    path = latest_checkpoint(root)
    if _dist():
        seen: list = [None] * _world()
        dist.all_gather_object(seen, path)
        if len(set(seen)) != 1:
            raise CheckpointError(f"ranks see different latest checkpoints under {root}: {seen} "
                                  "(checkpoints must be on a filesystem shared by all ranks)")
    if path is None:
        return 0
    return int(load_checkpoint(path, model, optimizer, lr_schedulers=lr_schedulers, verify=verify,
                               on_routing_change=on_routing_change)["step"])


# ----------------------------------------------------------------------------- torch-format state dicts


def check_optimizer_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Raise ValueError, naming the parameter, unless ``state_dict`` (torch.optim format) fits ``optimizer``.

    Used by ``DistMuon.load_state_dict`` before ``torch.optim.Optimizer.load_state_dict``: same
    groups and sizes, same parameter names (when saved), same algorithm and view options per
    group, every parameter's state present with the algorithm's keys and the same global shapes.
    Hyperparameters may differ: the saved values win (torch.optim semantics).
    """
    try:
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an optimizer state dict (needs 'state' and 'param_groups'): {e}") from None
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"the state dict has {len(saved_groups)} param groups, this optimizer {len(groups)} "
                         "(was the model routed differently?)")
    all_names = {n for g in groups for n in (g.get("param_names") or ())}
    for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
        names = list(group.get("param_names") or [f"param_groups[{gi}][{i}]" for i in range(len(group["params"]))])
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi} ({names[0] if names else 'empty'}, …): {len(saved['params'])} "
                             f"parameters in the state dict, {len(group['params'])} in this optimizer")
        saved_names = saved.get("param_names")
        if saved_names is not None and not _stage_of(names, saved_names, all_names):
            raise ValueError(f"param group {gi} holds {list(saved_names)} in the state dict but {names} in this "
                             "optimizer (build the param groups with the rules used when saving)")
        for key in STRUCTURAL_GROUP_KEYS:
            if key in saved and _normal(saved.get(key)) != _normal(group.get(key)):
                what = "routed to" if key == "algorithm" else f"{key}="
                raise ValueError(f"{names[0]}: {what}{saved.get(key)!r} in the state dict but {group.get(key)!r} "
                                 f"in this optimizer (param group {gi}; parameters {names})")
        for index, p, name in zip(saved["params"], group["params"], names):
            ours = {k: v for k, v in optimizer.state.get(p, {}).items() if not k.startswith("_")}
            theirs = saved_state.get(index)
            if theirs is None:
                if ours:
                    raise ValueError(f"{name}: no optimizer state in the state dict (expected {sorted(ours)})")
                continue
            if set(theirs) != set(ours):
                then, now = algorithm_of_keys(theirs), algorithm_of_keys(ours)
                detail = (f"routed to {then!r} in the state dict but {now!r} now" if then and now and then != now
                          else "state keys differ")
                raise ValueError(f"{name}: {detail}: saved {sorted(theirs)}, expected {sorted(ours)}")
            for k, v in ours.items():
                t = theirs[k]
                if isinstance(v, torch.Tensor) and isinstance(t, torch.Tensor) and tuple(t.shape) != tuple(v.shape):
                    raise ValueError(f"{name}: optimizer state {k!r} has shape {tuple(t.shape)} in the state dict "
                                     f"but {tuple(v.shape)} now")
