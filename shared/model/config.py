"""Typed, validated model and training settings, read once from the run config (`[tool.flwr.app.config]`).

Keys (kebab-case, as in pyproject.toml):
  model.encoder            local folder of a Hugging Face BERT checkpoint; "" = the packaged all-MiniLM-L6-v2
  model.max-text-tokens    tokens of item text kept (title + description + brand + category)
  model.dim                size of item and user embeddings
  model.attention-hidden   hidden units of the user tower's target attention
  model.head-hidden        hidden units of each ESMM tower
  model.max-position       positions above this share one position-bias slot
  model.ctr-prior          click rate the click tower starts from (its output bias = logit of it)
  model.cvr-prior          purchase-after-click rate the purchase tower starts from
  adapter.layers           number of top transformer layers that get a trainable adapter (0 = frozen embeddings)
  adapter.size             bottleneck size of each adapter
  train.epochs, train.batch-size, train.lr (Adam, decayed along a cosine over the epochs), train.weight-decay,
  train.patience (epochs without a better validation CTCVR AUC before stopping), train.device (auto | cpu | cuda),
  train.threads (0 = the CPUs given: OMP_NUM_THREADS, else all), train.seed
"""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import Section
from .errors import ModelConfigError

_DEVICES = ("auto", "cpu", "cuda")


def _positive(key: str, value: float, minimum: float = 1) -> None:
    if value < minimum:
        raise ModelConfigError(f"{key} = {value!r}: must be at least {minimum}")


@dataclass(frozen=True)
class ModelConfig(Section):
    encoder: str
    max_text_tokens: int
    dim: int
    attention_hidden: int
    head_hidden: int
    max_position: int
    ctr_prior: float
    cvr_prior: float
    adapter_layers: int
    adapter_size: int

    ERROR = ModelConfigError
    KEYS = {
        "model.encoder": "encoder", "model.max-text-tokens": "max_text_tokens", "model.dim": "dim",
        "model.attention-hidden": "attention_hidden", "model.head-hidden": "head_hidden",
        "model.max-position": "max_position", "model.ctr-prior": "ctr_prior", "model.cvr-prior": "cvr_prior",
        "adapter.layers": "adapter_layers", "adapter.size": "adapter_size",
    }

    def __post_init__(self) -> None:
        _positive("model.max-text-tokens", self.max_text_tokens, 4)
        for key in ("model.dim", "model.attention-hidden", "model.head-hidden", "model.max-position",
                    "adapter.size"):
            _positive(key, getattr(self, self.KEYS[key]))
        _positive("adapter.layers", self.adapter_layers, 0)
        for key in ("model.ctr-prior", "model.cvr-prior"):
            value = getattr(self, self.KEYS[key])
            if not 0 < value < 1:
                raise ModelConfigError(f"{key} = {value!r}: must be a rate strictly between 0 and 1, e.g. 0.05 "
                                       "(a typical click rate) or 0.25 (a typical purchase rate after a click)")


@dataclass(frozen=True)
class TrainConfig(Section):
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    patience: int
    device: str
    threads: int
    seed: int
    negative_rate: float

    ERROR = ModelConfigError
    KEYS = {
        "train.epochs": "epochs", "train.batch-size": "batch_size", "train.lr": "lr",
        "train.weight-decay": "weight_decay", "train.patience": "patience", "train.device": "device",
        "train.threads": "threads", "train.seed": "seed", "train.negative-rate": "negative_rate",
    }

    def __post_init__(self) -> None:
        _positive("train.epochs", self.epochs)
        _positive("train.batch-size", self.batch_size, 2)
        if not self.lr > 0:
            raise ModelConfigError(f"train.lr = {self.lr!r}: must be > 0")
        if self.weight_decay < 0:
            raise ModelConfigError(f"train.weight-decay = {self.weight_decay!r}: must be >= 0")
        _positive("train.patience", self.patience, 0)
        _positive("train.threads", self.threads, 0)
        if self.device not in _DEVICES:
            raise ModelConfigError(f"train.device = {self.device!r}: use one of {', '.join(_DEVICES)}")
        if not 0 < self.negative_rate <= 1:  # NaN fails this too
            raise ModelConfigError(f"train.negative-rate = {self.negative_rate!r}: the share of negative training "
                                   "examples each epoch keeps, in (0, 1]; 1 keeps all")
