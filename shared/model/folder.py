"""A model folder: what a trained conversion model is saved as, and loaded from.

  weights.safetensors   trainable weights only (adapters, projections, user tower, ESMM head)
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
from .weights import load_weights, save_weights

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
ENCODER = "encoder.json"
METRICS = "metrics.json"


def save_model_folder(folder: Path, model: ConversionModel, backbone: Backbone, settings: dict[str, Any],
                      metrics: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps({**settings, "model": model.config.to_dict()}, indent=2))
    (folder / ENCODER).write_text(json.dumps(encoder_reference(backbone, model.config.encoder), indent=2))
    if metrics is not None:
        (folder / METRICS).write_text(json.dumps(metrics, indent=2))
    write_digests(folder, (WEIGHTS, CONFIG, ENCODER, METRICS))
    return folder


def load_model_folder(folder: Path, backbone: Backbone | None = None) -> tuple[ConversionModel, Backbone, dict]:
    """The model saved in `folder` with its backbone and settings; clear errors for missing files, files that do
    not match their digests (changed, truncated, damaged) or another encoder than the one it was trained with."""
    folder = Path(folder)
    missing = [name for name in (WEIGHTS, CONFIG, ENCODER) if not (folder / name).is_file()]
    if missing:
        raise ModelConfigError(f"{folder} is not a complete fedcvr model folder: {', '.join(missing)} missing. "
                               "Pass the --out folder of `fedcvr train-central` (or of a federated run).")
    verify_digests(folder, (WEIGHTS, CONFIG, ENCODER), error=ModelConfigError)
    settings = json.loads((folder / CONFIG).read_text())
    reference = json.loads((folder / ENCODER).read_text())
    config = ModelConfig(**settings["model"])
    backbone = backbone or load_backbone(config.encoder)
    if backbone.key != reference["key"]:
        raise ModelConfigError(
            f"{folder / ENCODER}: the model was trained with the encoder {reference['encoder']} (weights key "
            f"{reference['key']}), but the encoder found at {backbone.path} has key {backbone.key}. Install or point "
            "model.encoder to the same checkpoint.")
    model = ConversionModel(backbone, config)
    load_weights(model, folder / WEIGHTS)
    return model, backbone, settings
