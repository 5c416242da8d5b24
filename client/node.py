"""What a merchant node does, as plain functions the ClientApp's handlers call.

A node reads its merchant folder once per process (examples, catalog and the cached frozen prefix are kept for
later messages of the same run), loads the global trainable weights it is sent, trains one round (DP-SGD by
default, see `fedcvr.shared.training.local`), evaluates, and saves the pushed-back final model. Only trainable
weights and metric sums leave the node; never a shopper id, an item text or an event row.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.dp_config import DPConfig
from fedcvr.shared.model.config import ModelConfig, TrainConfig
from fedcvr.shared.model.encoder import load_backbone
from fedcvr.shared.model.esmm import ConversionModel
from fedcvr.shared.model.folder import save_model_folder
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.model.weights import load_trainable_state, trainable_state
from fedcvr.shared.privacy import PrivacyLedger, PrivacyLedgerError, dp_report
from fedcvr.shared.settings import SettingsError, with_defaults
from fedcvr.shared.training.loop import ItemSide, model_sums, resolve_device
from fedcvr.shared.training.personalise import Outcome, PersonaliseConfig, personalise
from fedcvr.shared.training.prepare import Prepared, prepare


@dataclass(frozen=True)
class NodeSettings:
    """The run config as a node reads it: every section, each key from the run config or else the default the
    Flower App declares (`shared/settings.py`)."""

    model: ModelConfig
    train: TrainConfig
    dp: DPConfig
    examples: ExampleConfig
    rounds: int
    local_epochs: int
    personalise: PersonaliseConfig

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> NodeSettings:
        counts = with_defaults(("num-server-rounds", "local-epochs"), run_config)
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{key} = {value!r}: must be a whole number >= 1, e.g. {key} = 3")
        return cls(ModelConfig.from_run_config(run_config), TrainConfig.from_run_config(run_config),
                   DPConfig.from_run_config(run_config), ExampleConfig.from_run_config(run_config),
                   counts["num-server-rounds"], counts["local-epochs"], PersonaliseConfig.from_run_config(run_config))

    @property
    def lr(self) -> float:
        """The learning rate of local rounds: train.lr, or with DP dp.lr unless it is 0."""
        return self.dp.lr if self.dp.enabled and self.dp.lr > 0 else self.train.lr


class MerchantNode:
    """One merchant's data, model and item side, ready for training and evaluation messages."""

    def __init__(self, folder: Path, settings: NodeSettings):
        self.folder = folder
        self.settings = settings
        self.device = resolve_device(settings.train.device, settings.train.threads)
        self.backbone = load_backbone(settings.model.encoder)
        self.prepared: Prepared = prepare([load_merchant(folder)], settings.examples)
        cache = PrefixCache(self.backbone, settings.model.adapter_layers, settings.model.max_text_tokens)
        self.side = ItemSide(cache.states(self.prepared.catalog.texts), torch.from_numpy(self.prepared.catalog.numeric),
                             self.prepared.catalog.item_ids)
        self.model = ConversionModel(self.backbone, settings.model).to(self.device)
        self._personal: tuple[str, Any, dict[str, torch.Tensor] | None] | None = None  # (digest, memory, head)
        self.outcome: Outcome | None = None  # the last personalisation's (`personalise.py`)

    def load(self, arrays: Mapping[str, torch.Tensor], personalised: bool = False) -> None:
        """Load global weights: the global model alone, or with `personalised` global + local (`personalise.py`):
        the node's local layers fine-tuned on its own training split for these global weights, kept where its
        validation split rates them higher (trained once per distinct weights, then reused by evaluation and by the
        saved model)."""
        load_trainable_state(self.model, dict(arrays))
        self.model.memory = None
        if not personalised:
            return
        digest = weights_digest(arrays)
        if self._personal is None or self._personal[0] != digest:
            s = self.settings
            self.outcome = personalise(self.model, self.side, self.prepared, s.personalise, s.train.batch_size,
                                       s.train.seed, self.device)
            head = {k: v.detach().clone() for k, v in self.model.head.state_dict().items()}
            self._personal = (digest, self.model.memory, head if self.outcome.kept else None)
        _, self.model.memory, head = self._personal
        if head is not None and self.settings.personalise.head:
            self.model.head.load_state_dict(head)

    def train(self, arrays: Mapping[str, torch.Tensor], state, server_round: int, proximal_mu: float = 0.0,
              ledger_file: Path | None = None, federation: str = "",
              resumed_file: Path | None = None) -> tuple[dict[str, torch.Tensor] | None, dict[str, float | int], str]:
        """One round. Returns (new weights or None when declined, metrics, reason for declining).

        With DP, the node's privacy ledger lives in `state` (the node's context.state) and, when `ledger_file`
        is given, also on disk, so that what was spent survives a restarted node or a resumed run; `resumed_file`
        is the ledger the node kept in the run this one resumes (`resumed_ledger_path`)."""
        from fedcvr.shared.training.local import train_round  # with Opacus: only a training message needs it

        self.load(arrays)
        s = self.settings
        ledger = load_ledger(state, ledger_file, federation, resumed_file) if s.dp.enabled else None
        started = time.perf_counter()
        result = train_round(self.model, self.side, self.prepared.splits["train"], lr=s.lr,
                             batch_size=s.train.batch_size, local_epochs=s.local_epochs, dp=s.dp, ledger=ledger,
                             rounds=s.rounds, seed=s.train.seed * 100_003 + server_round, device=self.device,
                             proximal_mu=proximal_mu, negative_rate=s.train.negative_rate)
        report: dict[str, float | int] = {"num-examples": result.examples, "train-loss": result.loss,
                                          "steps": result.steps, "train-size": self.train_size(),
                                          "train-seconds": time.perf_counter() - started}
        if ledger is not None:
            keep_ledger(ledger, state, ledger_file, federation)
            report.update({k: v for k, v in dp_report(ledger, s.dp).items()})
        if not result.trained:
            return None, report, result.reason
        return trainable_state(self.model), report, ""

    def train_size(self) -> int:
        """Examples in the local training split (the weight of this node's update under secure aggregation)."""
        return len(self.prepared.splits["train"])

    def evaluate(self, arrays: Mapping[str, torch.Tensor], split: str = "validation", rank: bool = True,
                 personalised: bool = False) -> dict:
        """Metric sums of the given weights (with `personalised`: global + local) on one local split (a Flower
        MetricRecord's content); with `rank` also the full-catalog ranking sums: of each purchase (NDCG@K, HR@K),
        or on purchase logs of each shopper's next basket (`nb.*`)."""
        self.load(arrays, personalised)
        data = self.prepared.splits[split]
        record = model_sums(self.model, self.side, data, self.prepared.candidates, self.prepared.logs, self.device,
                            rank=rank, basket=self.prepared.baskets.get(split)).to_record()
        record["num-examples"] = len(data)
        return record

    def save_model(self, arrays: Mapping[str, torch.Tensor], model_dir: Path, version: str,
                   history: list | None = None) -> Path:
        """Save the pushed-back global model into the node's model folder, ready for local recommendation: with
        `personalise` (the default) global + local, the node's item memory in the folder's local file."""
        self.load(arrays, self.settings.personalise.enabled)
        settings = {"train": self.settings.train.to_dict(), "examples": self.settings.examples.to_dict(),
                    "version": version, "merchant": self.folder.name,
                    "personalised": None if self.outcome is None else self.outcome.describe()}
        folder = save_model_folder(model_dir, self.model, self.backbone, settings,
                                   {"history": history or []} if history is not None else None)
        (folder / "VERSION").write_text(version + "\n")
        return folder


def weights_digest(arrays: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the weights' names and bytes: which global model a personalisation belongs to."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(arrays[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


LEDGER_FILE = "privacy-ledger.json"
CHECKPOINT_FOLDER = "checkpoint"  # the coordinator's checkpoint folder inside its out-dir (server/checkpoint.py)


def load_ledger(state, ledger_file: Path | None, federation: str,
                resumed_file: Path | None = None) -> PrivacyLedger:
    """The node's ledger for this federation: of the one in `state`, the one in `ledger_file` and the one in
    `resumed_file` (the ledger the node kept in the run this one resumes), the one that has booked the most
    rounds (the node process restarted, or the server resumed a stopped run, perhaps into another folder). A file
    of another federation is not this run's spending and is ignored."""
    ledger = PrivacyLedger.load(state)
    for path in dict.fromkeys(p for p in (ledger_file, resumed_file) if p is not None):
        on_disk = _ledger_on_disk(path, federation)
        if on_disk is not None and on_disk.rounds_trained > ledger.rounds_trained:
            ledger = on_disk
    return ledger


def _ledger_on_disk(path: Path, federation: str) -> PrivacyLedger | None:
    """The ledger of `federation` in the file `path`; None when there is no such file or it is another
    federation's."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        on_disk = PrivacyLedger.from_record(saved["ledger"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrivacyLedgerError(f"{path}: the node's privacy ledger cannot be read ({exc}); restore it "
                                 "from a backup, or delete it only if this federation has not trained before") \
            from exc
    return on_disk if saved.get("federation") == federation else None


def keep_ledger(ledger: PrivacyLedger, state, ledger_file: Path | None, federation: str) -> None:
    """Save the ledger into `state` and, atomically, into `ledger_file`."""
    ledger.save(state)
    if ledger_file is None:
        return
    ledger_file.parent.mkdir(parents=True, exist_ok=True)
    staging = ledger_file.with_suffix(".tmp")
    staging.write_text(json.dumps({"federation": federation, "ledger": dict(ledger.to_record())}, indent=2) + "\n",
                       encoding="utf-8")
    staging.replace(ledger_file)


_NODES: dict[tuple, MerchantNode] = {}
# How many nodes one process keeps built: 1 on a real node (one merchant per process); a whole simulated
# federation in one process (simulations/inprocess.py) keeps one per merchant.
NODES_KEPT = {"count": 1}


def node_for(folder: Path, run_config: Mapping[str, Any]) -> MerchantNode:
    """The node of this process for `folder` and these settings, built once (later messages reuse it)."""
    key = (str(folder), json.dumps(dict(run_config), sort_keys=True, default=str))
    if key not in _NODES:
        while len(_NODES) >= max(NODES_KEPT["count"], 1):
            _NODES.pop(next(iter(_NODES)))  # the oldest
        _NODES[key] = MerchantNode(folder, NodeSettings.from_run_config(run_config))
    return _NODES[key]


def resolve_model_dir(node_config: Mapping[str, Any], run_config: Mapping[str, Any], merchant: str) -> Path:
    """Where the pushed-back model goes: `model-dir` of the node config (deployment), else
    `<out-dir>/models/<merchant>` of the run config (simulation)."""
    if node_config.get("model-dir"):
        return Path(str(node_config["model-dir"])).expanduser()
    out_dir = str(run_config.get("out-dir", "") or "")
    if not out_dir:
        raise ValueError("the node has nowhere to save the model: set `model-dir` in the node config "
                         "(--node-config \"model-dir='/srv/shop/model'\") or `out-dir` in the run config")
    return Path(out_dir) / "models" / merchant


def ledger_path(node_config: Mapping[str, Any], run_config: Mapping[str, Any], folder: Path) -> Path | None:
    """Where the node keeps its privacy ledger on disk: `state-dir` of the node config (deployment), else the
    node's model folder (`model-dir`, or `<out-dir>/models/<merchant>` in simulation); None when there is none."""
    if node_config.get("state-dir"):
        return Path(str(node_config["state-dir"])).expanduser() / LEDGER_FILE
    try:
        return resolve_model_dir(node_config, run_config, folder.name) / LEDGER_FILE
    except ValueError:
        return None


def resumed_ledger_path(node_config: Mapping[str, Any], run_config: Mapping[str, Any], folder: Path) -> Path | None:
    """In simulation, the ledger file the node kept in the run this one resumes: `<resumed run>/models/<merchant>/
    privacy-ledger.json`, where run config `resume` names the resumed run's folder or its `checkpoint/` folder.

    A simulated node keeps its ledger in the run's out-dir, so a run resumed into a new out-dir would otherwise
    start every node's spending from zero. The resumed run's own ledger files carry those of the run it resumed
    (a node writes what it carried into its new folder in its first round there, trained or declined), so a
    resume of a resume carries the whole federation's spending; a node that was never asked to train in a
    resumed run leaves no file there to carry on. None when the run is no resume, or when the node config names
    `state-dir` or `model-dir` (deployment): those folders outlive runs, so `ledger_path` already holds what the
    node spent."""
    resume = str(run_config.get("resume", "") or "")
    if not resume or node_config.get("state-dir") or node_config.get("model-dir"):
        return None
    run = Path(resume).expanduser()
    if run.name == CHECKPOINT_FOLDER and not (run / "models").is_dir():
        run = run.parent
    return run / "models" / folder.name / LEDGER_FILE
