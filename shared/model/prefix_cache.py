"""On-disk cache of the frozen backbone's hidden states up to the first adapter, per item text.

The backbone is frozen and an adapter sits after its layer's frozen BERT layer, so the hidden states that enter
the first adapter (the output of the first adapted layer's frozen BERT layer) depend only on the text. They are
computed once, stored as float16 and keyed by (backbone weights, number of BERT layers run, token limit) and by
the SHA-1 of the item text; training and re-encoding then run only the first adapter and the later adapted layers.

Layout: ROOT/<backbone key>-frozen<k>-tok<T>/shard-00000/{keys.npy, lengths.npy, states.npy}. Shards are only
ever added (written to a temporary folder and renamed), so an interrupted run never leaves a broken cache and
several runs can share it. With `adapter.layers = 0` ("pooled"), each entry is one vector: the mean-pooled last
hidden state.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .encoder import Backbone, check_adapter_layers, extended_mask, masked_mean

ENCODE_BATCH = 64


def default_cache_root() -> Path:
    """$FEDCVR_CACHE, else $XDG_CACHE_HOME/fedcvr/prefix, else ~/.cache/fedcvr/prefix."""
    if os.environ.get("FEDCVR_CACHE"):
        return Path(os.environ["FEDCVR_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fedcvr" / "prefix"


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@dataclass
class PrefixStates:
    """Cached prefix states of N items, in the order asked for.

    states (N, T, H) float16, lengths (N,) int: the real tokens of item i are states[i, :lengths[i]].
    """

    states: torch.Tensor
    lengths: torch.Tensor

    def gather(self, index: torch.Tensor, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """States (U, T', H) float32 and mask (U, T') of the items `index`, trimmed to their longest text."""
        lengths = self.lengths[index]
        width = int(lengths.max()) if len(index) else 1
        states = self.states[index, :width].to(device=device, dtype=torch.float32)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).to(device)
        return states, mask


class PrefixCache:
    """Frozen-prefix states of a backbone for `adapter_layers` adapted layers (0 = pooled embeddings)."""

    def __init__(self, backbone: Backbone, adapter_layers: int, max_tokens: int, root: Path | None = None):
        check_adapter_layers(backbone, adapter_layers)
        self.backbone = backbone
        # BERT layers the cache runs: those below the adapted ones, and the first adapted layer's frozen part
        self.frozen_layers = backbone.num_layers - adapter_layers + (1 if adapter_layers else 0)
        self.pooled = adapter_layers == 0
        self.max_tokens = max_tokens
        name = f"{backbone.key}-{'pooled' if self.pooled else f'frozen{self.frozen_layers}'}-tok{max_tokens}"
        self.folder = (root or default_cache_root()) / name

    def _index(self) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        if self.folder.is_dir():
            for shard in sorted(self.folder.glob("shard-*")):
                if (shard / "states.npy").is_file():
                    for row, key in enumerate(np.load(shard / "keys.npy")):
                        index[str(key)] = (shard, row)
        return index

    @torch.no_grad()
    def compute(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Prefix states (n, T, H) float16 and lengths (n,) of `texts`, computed now (no cache).

        Texts are tokenised once, then run in batches of similar length (shortest first), so a batch pads to its
        own longest text rather than to a long neighbour's; results go back to the order given."""
        model = self.backbone.model
        # a conversion model in training mode puts the BERT layers it wraps in training mode too (dropout): the
        # cached states are those of the frozen backbone, in evaluation mode
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            return self._compute(model, texts)
        finally:
            for module, training in modes:
                module.train(training)

    def _compute(self, model, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        width = 1 if self.pooled else self.max_tokens
        out_states = np.zeros((len(texts), width, self.backbone.hidden_size), np.float16)
        out_lengths = np.zeros(len(texts), np.int32)
        if not len(texts):
            return out_states, out_lengths
        encoded = self.backbone.tokenizer(list(texts), truncation=True, max_length=self.max_tokens)
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        for start in range(0, len(texts), ENCODE_BATCH):
            rows = order[start:start + ENCODE_BATCH]
            tokens = self.backbone.tokenizer.pad({key: [encoded[key][i] for i in rows] for key in encoded},
                                                 return_tensors="pt")
            mask = tokens["attention_mask"]
            hidden = model.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens.get("token_type_ids"))
            attention = extended_mask(mask, hidden.dtype)
            for layer in list(model.encoder.layer)[: self.frozen_layers]:
                # a conversion model moved to a GPU took the BERT layers it wraps with it (the backbone is shared)
                device = next(layer.parameters()).device
                hidden = layer(hidden.to(device), attention_mask=attention.to(device))
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            hidden = hidden.cpu()
            if self.pooled:
                hidden = masked_mean(hidden, mask)[:, None, :]
                out_lengths[rows] = 1
            else:
                out_lengths[rows] = mask.sum(1).numpy().astype(np.int32)
            out_states[rows, : hidden.shape[1]] = hidden.numpy().astype(np.float16)
        return out_states, out_lengths

    def _write_shard(self, keys: list[str], states: np.ndarray, lengths: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        np.save(tmp / "keys.npy", np.array(keys))
        np.save(tmp / "lengths.npy", lengths)
        np.save(tmp / "states.npy", states)
        number = len(list(self.folder.glob("shard-*")))
        while True:
            try:
                tmp.rename(self.folder / f"shard-{number:05d}")
                return
            except OSError:  # another run took that number
                number += 1

    def states(self, texts: Sequence[str], progress: Callable[[int, int], None] | None = None) -> PrefixStates:
        """Prefix states of `texts` (computing and caching those not cached yet), in the order given."""
        keys = [text_key(t) for t in texts]
        index = self._index()
        missing = sorted({k: t for k, t in zip(keys, texts) if k not in index}.items())
        step = ENCODE_BATCH * 16
        for start in range(0, len(missing), step):
            chunk = missing[start:start + step]
            states, lengths = self.compute([t for _, t in chunk])
            self._write_shard([k for k, _ in chunk], states, lengths)
            if progress:
                progress(min(start + step, len(missing)), len(missing))
        if missing:
            index = self._index()
        width = 1 if self.pooled else self.max_tokens
        out = np.zeros((len(keys), width, self.backbone.hidden_size), np.float16)
        lengths = np.zeros(len(keys), np.int64)
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = index[key]
            by_shard.setdefault(shard, []).append((position, row))
        for shard, pairs in by_shard.items():
            shard_states = np.load(shard / "states.npy", mmap_mode="r")
            shard_lengths = np.load(shard / "lengths.npy")
            positions, rows = (np.array(v) for v in zip(*pairs))
            order = np.argsort(rows)
            out[positions[order]] = shard_states[rows[order]]
            lengths[positions] = shard_lengths[rows]
        longest = int(lengths.max()) if len(lengths) else 1
        return PrefixStates(states=torch.from_numpy(out[:, :longest].copy()), lengths=torch.from_numpy(lengths))
