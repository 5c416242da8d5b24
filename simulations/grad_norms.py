"""Per-example gradient norms of one merchant's training examples, by label: what DP-SGD's clipping does to them.

DP-SGD clips each example's gradient to `dp.max-grad-norm` (C) before adding noise of standard deviation
noise multiplier x C. Examples whose gradient is larger than C count less than the loss says. This prints, at the
app's initial weights (or a model folder's), the quantiles of the per-example gradient norm of unclicked, clicked
and purchased impressions, and for several C the norm of the mean clipped gradient of the batch next to the norm
of the noise one step adds to it at noise multiplier 1.

    python -m fedcvr.simulations.grad_norms --data data/demo --merchant merchant-01 [--batch 1024]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from opacus import GradSampleModule

from fedcvr.client.node import MerchantNode, NodeSettings
from fedcvr.shared import flower_app
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.shared.model.esmm import esmm_loss
from fedcvr.shared.training.local import PerSampleModel, _private_inputs
from fedcvr.simulations.local_only import initial_weights

CLIP_NORMS = (0.1, 0.3, 1.0, 3.0, 10.0)


def per_example_gradients(node: MerchantNode, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), trainable parameters): each example's gradient of its own ESMM loss."""
    data = node.prepared.splits["train"]
    private = GradSampleModule(PerSampleModel(node.model), loss_reduction="sum")
    ctr, cvr = private(*_private_inputs(node.model, node.side, data, rows, node.device))
    labels = torch.from_numpy(data.clicked[rows]).to(node.device), \
        torch.from_numpy(data.purchased[rows]).to(node.device)
    esmm_loss(ctr, cvr, *labels, reduction="none").sum().backward()
    grads = [p.grad_sample.reshape(len(rows), -1) for p in private.parameters()
             if p.requires_grad and p.grad_sample is not None]
    private._close()
    return torch.cat(grads, 1).detach()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo", help="marketplace folder")
    parser.add_argument("--merchant", default="", help="merchant folder name (default: the first)")
    parser.add_argument("--batch", type=int, default=1024, help="training examples drawn at random")
    parser.add_argument("--run-config", default="", help='overrides, "key=value ..." with TOML values')
    args = parser.parse_args(argv)
    run_config = flower_app.defaults_with(args.run_config)
    folders = merchant_folders(args.data)
    folder = next((f for f in folders if f.name == args.merchant), None) if args.merchant else folders[0]
    if folder is None:
        parser.error(f"--merchant {args.merchant}: no such merchant folder in {args.data} "
                     f"(there are: {', '.join(f.name for f in folders)})")
    node = MerchantNode(folder, NodeSettings.from_run_config(run_config))
    node.load(initial_weights(run_config))
    data = node.prepared.splits["train"]
    rows = np.random.default_rng(0).choice(len(data), min(args.batch, len(data)), replace=False)
    grads = per_example_gradients(node, rows)
    norms = grads.norm(dim=1).cpu().numpy()
    clicked, purchased = data.clicked[rows] > 0, data.purchased[rows] > 0
    groups = {"unclicked": ~clicked, "clicked, not purchased": clicked & ~purchased, "purchased": purchased}
    print(f"{folder.name}: {len(rows)} training examples, {grads.shape[1]:,} trainable parameters")
    out: dict = {"merchant": folder.name, "examples": len(rows), "groups": {}, "clip": {}}
    for name, mask in groups.items():
        if mask.any():
            q = np.quantile(norms[mask], [0.1, 0.5, 0.9])
            out["groups"][name] = {"n": int(mask.sum()), "p10": q[0], "median": q[1], "p90": q[2]}
            print(f"  {name:<24} n={int(mask.sum()):>5}  gradient norm p10 {q[0]:.3f}  median {q[1]:.3f}  "
                  f"p90 {q[2]:.3f}")
    for c in CLIP_NORMS:
        clipped = grads * torch.from_numpy(c / np.maximum(norms, c)).to(grads)[:, None]
        mean_norm = float(clipped.mean(0).norm())
        noise_norm = c / len(rows) * grads.shape[1] ** 0.5
        kept = float(np.mean(np.minimum(1.0, c / norms[clicked]))) if clicked.any() else None
        out["clip"][c] = {"mean-clipped": mean_norm, "noise-at-1": noise_norm, "clicked-weight": kept}
        print(f"  C = {c:<5} mean clipped gradient norm {mean_norm:.4f}   noise norm at multiplier 1 "
              f"{noise_norm:.4f}" + (f"   clicked examples keep {kept:.2f} of their gradient" if kept is not None
                                     else "   (no clicked example drawn)"))
    return out


if __name__ == "__main__":
    main()
