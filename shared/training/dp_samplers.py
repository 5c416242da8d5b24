"""Opacus per-sample gradient and gradient-norm functions for the model's small lookup tables (`TableEmbedding`).

Opacus's own norm function for embeddings (ghost clipping) finds the distinct (example, row) pairs with
`torch.unique(dim=0)`, which on a CPU costs more than the rest of a DP step together. For a table of V rows the same
per-example sums fit in a (B x V, D) tensor: each example's gradient of the table is summed into its own V rows
with one `index_add_`, and its norm is taken over those rows. It is the same quantity (tested against Opacus's
function and against one-example autograd), computed without the sort. Larger tables keep Opacus's function.

The per-sample gradients (`dp.grad-sample-mode = "hooks"`) are Opacus's embedding function, registered for the
subclass. Clipping, noise and accounting stay Opacus's.
"""

from __future__ import annotations

import torch
from opacus.grad_sample.embedding import compute_embedding_grad_sample, compute_embedding_norm_sample
from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

from ..model.table import TableEmbedding

MAX_DENSE = 1 << 22  # B x V x D floats (16 MB) above which the sort-based function of Opacus is used


def table_norm_sample(layer: TableEmbedding, activations: list[torch.Tensor],
                      backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """{weight: (B,) norm of each example's gradient of the table}, from ids (B, ...) and backprops (B, ..., D)."""
    ids = activations[0]
    batch, rows, dim = ids.shape[0], layer.num_embeddings, layer.embedding_dim
    if batch * rows * dim > MAX_DENSE:
        return compute_embedding_norm_sample(layer, activations, backprops)
    ids = ids.reshape(batch, -1)
    grads = backprops.reshape(batch, -1, dim)
    slots = (torch.arange(batch, device=ids.device)[:, None] * rows + ids).reshape(-1)
    summed = torch.zeros(batch * rows, dim, device=grads.device, dtype=grads.dtype)
    summed.index_add_(0, slots, grads.reshape(-1, dim))
    return {layer.weight: torch.linalg.vector_norm(summed.view(batch, rows * dim), dim=1)}


def register() -> None:
    """Make Opacus use these functions for `TableEmbedding` (idempotent; runs on import)."""
    register_grad_sampler(TableEmbedding)(compute_embedding_grad_sample)
    register_norm_sampler(TableEmbedding)(table_norm_sample)


register()
