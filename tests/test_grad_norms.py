"""The per-example gradient-norm report behind docs/experiments.md's account of what DP clipping costs."""

from __future__ import annotations

import numpy as np
import torch

from fedcvr.client.node import MerchantNode, NodeSettings
from fedcvr.shared import flower_app
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.shared.model.esmm import esmm_loss
from fedcvr.shared.training.local import PerSampleModel, _private_inputs
from fedcvr.simulations.grad_norms import main, per_example_gradients


def overrides(tiny_bert) -> str:
    return (f"model.encoder='{tiny_bert}' model.dim=8 model.attention-hidden=8 model.head-hidden=8 "
            "model.max-text-tokens=32 examples.history-length=8")


def test_per_example_gradients_are_each_examples_own(tiny_market, tiny_bert):

    run_config = flower_app.defaults_with(overrides(tiny_bert))
    node = MerchantNode(merchant_folders(tiny_market)[0], NodeSettings.from_run_config(run_config))
    data = node.prepared.splits["train"]
    rows = np.flatnonzero(data.clicked > 0)[:2].tolist() + np.flatnonzero(data.clicked == 0)[:2].tolist()
    grads = per_example_gradients(node, np.array(rows))
    for i, row in enumerate(rows):  # plain autograd on that one example alone
        node.model.zero_grad(set_to_none=True)
        ctr, cvr = PerSampleModel(node.model)(*_private_inputs(node.model, node.side, data, np.array([row]),
                                                               node.device))
        esmm_loss(ctr, cvr, torch.from_numpy(data.clicked[[row]]), torch.from_numpy(data.purchased[[row]])).backward()
        own = torch.cat([p.grad.reshape(-1) for p in node.model.trainable_parameters() if p.grad is not None])
        torch.testing.assert_close(grads[i], own, rtol=1e-4, atol=1e-6)


def test_report_names_the_groups_and_the_clip_norms(tiny_market, tiny_bert, capsys):
    out = main(["--data", str(tiny_market), "--merchant", "merchant-02", "--batch", "200",
                "--run-config", overrides(tiny_bert)])
    text = capsys.readouterr().out
    assert out["merchant"] == "merchant-02" and out["examples"] == 200 and "unclicked" in out["groups"]
    assert "C = 1.0" in text and "mean clipped gradient norm" in text
    for c, row in out["clip"].items():  # a mean of vectors each of norm <= C has norm <= C
        assert 0 < row["mean-clipped"] <= c * (1 + 1e-5) and row["noise-at-1"] > 0
