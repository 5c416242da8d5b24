"""A model folder: what a trained conversion model is saved as, and loaded from.

  weights.safetensors   trainable weights only (adapters, projections, user tower, ESMM head)
  local.safetensors     where the model has one: its local item memory (`memory.py`), with the item ids of its
                        rows in the file's metadata; never part of a federated message
  config.json           model, training and example settings
  encoder.json          the encoder it was trained with (name, folder, weights key): loading refuses another one
  metrics.json          evaluation results (written by the trainer)
  SHA256SUMS            SHA-256 digests of the files above, checked on load (`fedcvr.shared.integrity`)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..integrity import verify_digests, write_digests
from .config import ModelConfig
from .encoder import Backbone, encoder_reference, load_backbone
from .errors import ModelConfigError
from .esmm import ConversionModel
from .memory import load_memory, save_memory
from .weights import load_weights, save_weights

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
ENCODER = "encoder.json"
METRICS = "metrics.json"
LOCAL = "local.safetensors"


def save_model_folder(folder: Path, model: ConversionModel, backbone: Backbone, settings: dict[str, Any],
                      metrics: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / WEIGHTS)
    if model.memory is not None:
        save_memory(model.memory, folder / LOCAL)
    elif (folder / LOCAL).exists():
        (folder / LOCAL).unlink()  # a memory of an earlier model in this folder does not belong to this one
    (folder / CONFIG).write_text(json.dumps({**settings, "model": model.config.to_dict()}, indent=2))
    (folder / ENCODER).write_text(json.dumps(encoder_reference(backbone, model.config.encoder), indent=2))
    if metrics is not None:
        (folder / METRICS).write_text(json.dumps(metrics, indent=2))
    write_digests(folder, (WEIGHTS, CONFIG, ENCODER, METRICS, LOCAL))
    return folder


def load_model_folder(folder: Path, backbone: Backbone | None = None) -> tuple[ConversionModel, Backbone, dict]:
    """The model saved in `folder` with its backbone and settings; clear errors for missing files, files that do
    not match their digests (changed, truncated, damaged) or another encoder than the one it was trained with."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, CONFIG, ENCODER) if not (folder / name).is_file()]
    if missing:
        raise ModelConfigError(f"{folder} is not a complete fedcvr model folder: {', '.join(missing)} missing. "
                               "Pass the --out folder of `fedcvr train-central` (or of a federated run).")
    local = (LOCAL,) if (folder / LOCAL).is_file() else ()
    verify_digests(folder, (WEIGHTS, CONFIG, ENCODER, *local), error=ModelConfigError)
    settings = json.loads((folder / CONFIG).read_text())
    reference = json.loads((folder / ENCODER).read_text())
    config = ModelConfig.defaults(**settings["model"])
    backbone = backbone or load_backbone(config.encoder)
    if backbone.key != reference["key"]:
        raise ModelConfigError(
            f"{folder / ENCODER}: the model was trained with the encoder {reference['encoder']} (weights key "
            f"{reference['key']}), but the encoder found at {backbone.path} has key {backbone.key}. Install or point "
            "model.encoder to the same checkpoint.")
    model = ConversionModel(backbone, config)
    load_weights(model, folder / WEIGHTS)
    if local:
        try:
            model.memory = load_memory(folder / LOCAL, config.dim)
        except ValueError as err:
            raise ModelConfigError(str(err)) from None
    return model, backbone, settings
