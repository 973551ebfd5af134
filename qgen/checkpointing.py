"""What every stage's checkpoint holds beyond Lightning's defaults, and what it leaves out.

- Only trainable weights: under LoRA / QLoRA the adapter, never the frozen or quantized base (nor a
  teacher or reference model), so a 14B checkpoint is megabytes.
- RNG states, as plain values (lists and tensors) so checkpoints load with ``torch.load(weights_only=True)``.
  Lightning does not save them; without them a resumed run draws different dropout masks and samples
  than the uninterrupted run would have.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import sys
import tempfile
from typing import Any

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from qgen.watchdog import stage


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, not a checkpoint, or holding code-running objects."""


def load_checkpoint_file(path: str, mmap: bool = False, map_location: Any = "cpu") -> dict[str, Any]:
    """The one way qgen reads a ``.ckpt``: ``torch.load(weights_only=True)``, so nothing in it can run code
    (a pickled object, a ``__reduce__`` payload, is refused); every failure names the file.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder (a sharded checkpoint?); qgen reads single-file "
                              "checkpoints only (a distributed checkpoint's metadata is a pickle)")  # fmt: skip
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (a write was interrupted?)")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is refused: it holds objects that only full unpickling could build, and unpickling "
            f"can run code ({first})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a checkpoint): {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint (it holds a {type(data).__name__})")
    return data


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: write a temporary file in the same folder
    (so the rename cannot cross filesystems, as one into ``$TMPDIR`` would), fsync it, then ``os.replace``.
    Until the replace, ``path`` still holds the previous complete file.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O for every qgen run: atomic same-folder writes (:func:`atomic_torch_save`)
    and loads that refuse anything that could run code (:func:`load_checkpoint_file`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with stage("checkpoint"):  # a deadline for the write (qgen.watchdog); an exit mid-way leaves the old file
            atomic_torch_save(checkpoint, os.fspath(path))

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: Any = None) -> dict[str, Any]:
        # whatever the caller asks for, the load is restricted to tensors and plain values
        return load_checkpoint_file(os.fspath(path), map_location=map_location or "cpu")


def get_rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(state), gauss_next],
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter's name without the module levels that FSDP1 units (and checkpoint wrappers) insert: the
    name the same parameter has in an unwrapped model, as checkpoints store it.
    """
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def slim_checkpoint(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint`` of every stage: keep the trainable weights only, add the RNG states."""
    names = {clean_name(n) for n, p in module.named_parameters() if p.requires_grad}
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in names}
    checkpoint["rng_states"] = get_rng_states()


def continue_unfinished_epoch(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written as ``max_steps`` stopped the run mid-epoch resume *inside* that epoch.

    When ``max_steps`` ends a run, Lightning closes the epoch loop and counts the epoch as completed before
    the final ``last.ckpt`` is written, so a run extended with a larger ``max_steps`` would start a new epoch
    and skip the rest of the old one. Here the epoch is put back to "started, not finished" (as in a
    checkpoint written mid-epoch), and the train loader's position to that epoch, so the extended run reads
    the remaining batches of the epoch first, exactly as one longer run would.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop")
    max_steps = getattr(trainer, "max_steps", -1)
    if not loops or max_steps is None or max_steps < 0 or trainer.global_step < max_steps:
        return
    batches, epochs = loops["epoch_loop.batch_progress"], loops["epoch_progress"]
    finished = epochs["current"]["completed"] == epochs["current"]["ready"] > 0
    if batches.get("is_last_batch", True) or not finished or batches["current"]["ready"] == 0:
        return
    for counter in (epochs["total"], epochs["current"]):
        counter["completed"] -= 1
        counter["processed"] -= 1
    checkpoint["epoch"] = max(0, checkpoint.get("epoch", 1) - 1)
    loader_states = loops.get("state_dict", {}).get("combined_loader") or []
    for state in loader_states:
        if isinstance(state, dict) and "epoch" in state:
            state["epoch"] = max(0, state["epoch"] - 1)


def restore_rng(checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint`` of every stage."""
    if "rng_states" in checkpoint:
        set_rng_states(checkpoint["rng_states"])


def content_hash(path: str) -> str:
    """SHA-256 of a file, or of a folder's files (names and bytes, sorted): identifies a starting policy."""
    import hashlib

    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))  # fmt: skip
    for name in files:
        digest.update(os.path.basename(name).encode())
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def describe_source(path: str, checkpoint_dir: str | None) -> dict[str, str]:
    """How a checkpoint names the model it was started from: absolute path, content hash, and the path
    relative to the checkpoint's own folder (to find it again when both moved together).
    """
    path = os.path.abspath(path)
    info = {"path": path, "sha256": content_hash(path)}
    if checkpoint_dir:
        info["relative"] = os.path.relpath(path, os.path.abspath(checkpoint_dir))
    return info


def locate_source(ckpt_path: str, recorded: str, info: dict | None) -> str:
    """The starting policy of ``ckpt_path``: its recorded path if it is there, else the same relative position
    beside the checkpoint; with a recorded hash, the file found must match it.
    """
    info = info or {}
    candidates = [info.get("path") or recorded]
    if not os.path.isabs(recorded):  # checkpoints of older qgen versions: relative to the run's working folder
        candidates.append(os.path.abspath(recorded))
    if info.get("relative"):
        candidates.append(os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), info["relative"])))
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            if info.get("sha256") and content_hash(candidate) != info["sha256"]:
                raise CheckpointError(f"{ckpt_path} was trained on top of {candidate}, which has changed since "
                                      "(its SHA-256 differs); restore that file or retrain")  # fmt: skip
            return candidate
    raise CheckpointError(f"{ckpt_path} was trained on top of {recorded}, which is gone (looked in: "
                          f"{', '.join(dict.fromkeys(c for c in candidates if c))})")  # fmt: skip


def find_last_checkpoint(root: str = "lightning_logs", class_path: str | None = None) -> str:
    """The newest ``version_N/checkpoints/last.ckpt`` under ``root`` written by a ``class_path`` module.

    Filtering by the module class keeps ``--ckpt_path last`` of a GRPO run from picking up the SFT run
    that it was started from (both live under ``lightning_logs/``). A ``last.ckpt`` that cannot be read (an
    interrupted write, a foreign file) is skipped with a warning naming it, and the next newest is taken.
    """
    found = sorted(glob.glob(os.path.join(root, "**", "checkpoints", "last.ckpt"), recursive=True),
                   key=os.path.getmtime, reverse=True)  # fmt: skip
    for path in found:
        try:
            hparams = load_checkpoint_file(path, mmap=True).get("hyper_parameters") or {}
        except CheckpointError as err:
            print(f"qgen: warning: skipping {path}: {err}", file=sys.stderr)
            continue
        if class_path is None or same_class(hparams.get("_class_path"), class_path):
            return path
    which = f" from {class_path}" if class_path else ""
    raise FileNotFoundError(f"--ckpt_path last: no last.ckpt{which} under {root}/; run `fit` first or give a path")


def same_class(a: str | None, b: str | None) -> bool:
    """``qgen.SFTModule`` and ``qgen.sft.SFTModule`` name one class."""
    if not a or not b:
        return False
    return a.rsplit(".", 1)[-1] == b.rsplit(".", 1)[-1] and a.split(".", 1)[0] == b.split(".", 1)[0]
