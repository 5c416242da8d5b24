"""What a deployed node's fresh process per message loads: a message that needs no model loads no torch, and a
node with frozen embeddings whose items are all in the prefix cache never reads the BERT weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from support import REPO, federation

from fedcvr.client.node import MerchantNode, NodeSettings
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.shared.model import encoder
from fedcvr.shared.model.weights import trainable_state

HEAVY = ("torch", "transformers", "opacus", "pandas")


def test_the_client_app_imports_no_model_library():
    probe = f"""
import json, sys
import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
import fedcvr.client.app as app
loaded = {{m: m in sys.modules for m in {HEAVY!r}}}
# a handler that needs the weights as tensors gets them (flwr converts only once torch is imported)
weights = app._weights(RecordDict({{"arrays": ArrayRecord({{"w": Array(np.ones(3, np.float32))}})}}))
print(json.dumps({{"loaded": loaded, "tensor": type(weights["w"]).__name__, "sum": float(weights["w"].sum())}}))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"loaded": dict.fromkeys(HEAVY, False), "tensor": "Tensor", "sum": 3.0}


def test_a_node_with_cached_frozen_embeddings_never_reads_the_bert_weights(tiny_market, tiny_bert, tmp_path,
                                                                           monkeypatch):
    _, run_config = federation(tiny_market, tiny_bert, tmp_path, **{"adapter.layers": 0})
    folder = merchant_folders(tiny_market)[0]
    first = MerchantNode(folder, NodeSettings.from_run_config(run_config))  # fills the prefix cache if it must
    monkeypatch.setattr(encoder, "_LOADED", {})  # a fresh process: nothing loaded yet
    node = MerchantNode(folder, NodeSettings.from_run_config(run_config))
    assert not node.backbone.loaded
    assert torch.equal(node.side.prefix.states, first.side.prefix.states)
    record = node.evaluate(trainable_state(first.model), "validation", rank=False)
    assert record["num-examples"] > 0 and not node.backbone.loaded
    # an adapted layer needs the weights: they load on first use, and agree with the config's sizes
    assert node.backbone.model.config.hidden_size == node.backbone.hidden_size
    assert node.backbone.loaded
