"""The coordinator's checkpoint, written after every round, and reading it back to resume a stopped run.

A checkpoint is the folder `<out-dir>/checkpoint/`:
  checkpoint.json             round done, strategy, federation id, planned rounds, the metrics history so far
  weights.safetensors         the global trainable weights after that round
  server-optimizer.safetensors  the server optimiser's moments (FedAdam's m_t, v_t); absent for FedAvg/FedProx
  SHA256SUMS                  SHA-256 digests of the files above, checked before resuming

It is written to a temporary folder and then renamed over the old one, so a run killed mid-write leaves the
previous checkpoint whole. Resume with `--run-config "resume='<out-dir>'"` (the run folder or its checkpoint/).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from fedcvr.shared.integrity import verify_digests, write_digests

FOLDER = "checkpoint"
META = "checkpoint.json"
WEIGHTS = "weights.safetensors"
OPTIMIZER = "server-optimizer.safetensors"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the run that wants to resume from it."""


@dataclass
class Checkpoint:
    """Everything a resumed run needs to continue exactly where the stopped one ended."""

    round: int
    strategy: str
    federation: str
    planned_rounds: int
    arrays: dict[str, torch.Tensor]
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write `<out_dir>/checkpoint/` atomically (temporary folder, then rename); returns its path."""
    final = out_dir / FOLDER
    staging = out_dir / f".{FOLDER}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint.arrays.items()}, str(staging / WEIGHTS))
    if checkpoint.optimizer:
        save_numpy({k: np.ascontiguousarray(v) for k, v in checkpoint.optimizer.items()}, str(staging / OPTIMIZER))
    meta = {"format": FORMAT, "round": checkpoint.round, "strategy": checkpoint.strategy,
            "federation": checkpoint.federation, "planned-rounds": checkpoint.planned_rounds,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "history": checkpoint.history}
    (staging / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    write_digests(staging, (META, WEIGHTS, OPTIMIZER))
    old = out_dir / f".{FOLDER}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_folder(path: Path) -> Path:
    """The checkpoint folder for `path`: the folder itself, or `<path>/checkpoint/` for a run folder."""
    path = Path(path).expanduser()
    if (path / META).is_file():
        return path
    if (path / FOLDER / META).is_file():
        return path / FOLDER
    raise CheckpointError(f"resume = '{path}': no checkpoint there (looked for {path / META} and "
                          f"{path / FOLDER / META}). Pass the out-dir of the stopped run, or its checkpoint/ folder; "
                          "a checkpoint is written after each finished round.")


def load_checkpoint(path: Path) -> Checkpoint:
    """Read the checkpoint at `path` (a run folder or its checkpoint/ folder); CheckpointError names what is wrong."""
    folder = checkpoint_folder(path)
    verify_digests(folder, (META, WEIGHTS), error=CheckpointError)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{folder / META}: cannot be read ({exc}); the checkpoint is damaged, resume from an "
                              "intact copy or start the run again") from exc
    missing = [k for k in ("format", "round", "strategy", "federation", "planned-rounds", "history") if k not in meta]
    if missing:
        raise CheckpointError(f"{folder / META}: lacks {', '.join(missing)}; it was not written by fedcvr's server")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{folder / META}: format = {meta['format']!r}, this fedcvr reads format {FORMAT}")
    if not (folder / WEIGHTS).is_file():
        raise CheckpointError(f"{folder / WEIGHTS} is missing: the checkpoint is incomplete; resume from an intact "
                              "copy or start the run again")
    arrays = load_file(str(folder / WEIGHTS))
    optimizer = load_numpy(str(folder / OPTIMIZER)) if (folder / OPTIMIZER).is_file() else {}
    return Checkpoint(round=int(meta["round"]), strategy=str(meta["strategy"]), federation=str(meta["federation"]),
                      planned_rounds=int(meta["planned-rounds"]), arrays=arrays, optimizer=optimizer,
                      history=list(meta["history"]))


def check_fits(checkpoint: Checkpoint, *, strategy: str, num_server_rounds: int,
               initial: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse a checkpoint that another strategy or model wrote, or one with nothing left to do."""
    where = checkpoint_folder(source) / META
    if checkpoint.strategy != strategy:
        raise CheckpointError(f"{where}: strategy = '{checkpoint.strategy}', but this run has strategy = "
                              f"'{strategy}'; resume with --run-config \"strategy='{checkpoint.strategy}'\"")
    if checkpoint.round >= num_server_rounds:
        raise CheckpointError(f"{where}: round {checkpoint.round} is done, and num-server-rounds = "
                              f"{num_server_rounds} leaves nothing to train; raise num-server-rounds above "
                              f"{checkpoint.round}")
    theirs = {k: tuple(v.shape) for k, v in checkpoint.arrays.items()}
    ours = {k: tuple(v.shape) for k, v in initial.items()}
    if theirs != ours:
        differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        raise CheckpointError(f"{checkpoint_folder(source) / WEIGHTS}: the weights do not fit this run's model "
                              f"({len(differ)} differ, e.g. {differ[:3]}); resume with the model.* and adapter.* "
                              "settings of the stopped run")
