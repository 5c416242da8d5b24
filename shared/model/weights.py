"""Save and load the trainable weights only (adapters, projections, user tower, head): the frozen backbone
never leaves a node. One matched pair of functions, used for model folders and for federated updates alike."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .memory import PREFIX as MEMORY


def _global(name: str) -> bool:
    return not name.startswith(MEMORY)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of every global parameter that trains, in a stable order: what federated messages carry.
    The backbone's frozen weights and the local item memory (`memory.*`, never sent) are left out."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad and _global(name)}


def local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> tensor of the local item memory (`memory.*`): kept on the node, never sent."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if not _global(name)}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's global trainable parameters; name every missing, unexpected or mis-shaped key
    (a `memory.*` key is unexpected: the local memory never travels)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad and _global(name)}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    wrong = sorted(k for k in set(params) & set(state) if tuple(params[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            details.append(f"unexpected: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            details.append("wrong shape: " + ", ".join(
                f"{k} {tuple(state[k].shape)} != {tuple(params[k].shape)}" for k in wrong[:5]))
        raise ValueError("the weights do not fit this model (" + "; ".join(details) + "). They were trained with "
                         "another model configuration (model.dim, adapter.layers, adapter.size, ...) or encoder.")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(state[name].to(parameter.dtype))


def save_weights(model: nn.Module, path: Path) -> None:
    save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, str(path))


def load_weights(model: nn.Module, path: Path) -> None:
    load_trainable_state(model, load_file(str(path)))


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Global and local trainable weights together (a snapshot to return to, e.g. the best epoch's)."""
    return {**trainable_state(model), **local_state(model)}


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore a `full_state` snapshot."""
    load_trainable_state(model, {k: v for k, v in state.items() if _global(k)})
    local = {name: p for name, p in model.named_parameters() if not _global(name)}
    with torch.no_grad():
        for name, value in state.items():
            if not _global(name):
                local[name].copy_(value)
