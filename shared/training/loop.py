"""Training steps, prediction, full-catalog ranking and evaluation sums for the conversion model."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import metrics, node_metrics
from ..data.signals import EventLog
from ..evaluation.baskets import BasketTask
from ..evaluation.next_basket import ranking_sums
from ..model.errors import ModelConfigError
from ..model.esmm import ConversionModel, ScoreInputs, esmm_loss
from ..model.prefix_cache import PrefixStates
from .data import TrainingSet, batch_rows, make_batch

EVAL_BATCH = 2048
ENCODE_CHUNK = 512
RANK_PAIRS = 16_384  # (purchase, candidate) pairs scored at once in full-catalog ranking (bounds memory)


def cpu_threads(threads: int = 0) -> int:
    """`train.threads`, or for 0 the CPUs this process is given: OMP_NUM_THREADS where it is set (Flower's
    simulation gives each node `client-resources-num-cpus` this way), else every CPU it may run on."""
    if threads:
        return threads
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return len(os.sched_getaffinity(0))


def resolve_device(device: str, threads: int = 0) -> torch.device:
    """`train.device` -> a torch device (auto = CUDA where there is one, else CPU); sets the CPU thread count
    (`cpu_threads`): more threads than CPUs given slows every node down when several share a machine."""
    torch.set_num_threads(cpu_threads(threads))
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError("train.device = 'cuda': no CUDA device is visible here; use 'auto' or 'cpu'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class ItemSide:
    """What encoding items needs: cached prefix states and price features of the whole catalog, and its item ids
    (for the model's local item memory, keyed by id)."""

    prefix: PrefixStates
    numeric: torch.Tensor  # (N, 2)
    item_ids: np.ndarray | None = None
    _memory_rows: tuple[int, torch.Tensor] | None = field(default=None, repr=False)

    def encode(self, model: ConversionModel, items: torch.Tensor, device: torch.device) -> torch.Tensor:
        """(U, D) embeddings of catalog rows `items`: text and price, plus the item's local memory where the model
        has one (`model/memory.py`)."""
        states, mask = self.prefix.gather(items, device)
        encoded = model.encode_items(states, mask, self.numeric[items].to(device))
        if model.memory is None:
            return encoded
        return encoded + model.memory(self.memory_rows(model.memory)[items].to(device))

    def memory_rows(self, memory) -> torch.Tensor:
        """(N,) row of each catalog item in `memory` (-1 = none), computed once per memory."""
        if self._memory_rows is None or self._memory_rows[0] != id(memory):
            if self.item_ids is None:
                raise ValueError("this item side has no item ids, so the model's local item memory cannot be used")
            self._memory_rows = (id(memory), torch.from_numpy(memory.rows(self.item_ids)))
        return self._memory_rows[1]


def train_step(model: ConversionModel, side: ItemSide, data: TrainingSet, rows: np.ndarray,
               optimizer: torch.optim.Optimizer, device: torch.device,
               extra_loss: Callable[[], torch.Tensor] | None = None) -> float:
    """One optimiser step on the examples `rows` (each distinct item encoded once); returns the ESMM loss."""
    batch = make_batch(data, rows).to(device)
    items = side.encode(model, batch.items, device)
    ctr, cvr, _ = model.score(items, batch.inputs)
    loss = esmm_loss(ctr, cvr, batch.clicked, batch.purchased, log_q=batch.log_q)
    if extra_loss is not None:
        loss = loss + extra_loss()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_epoch(model: ConversionModel, side: ItemSide, data: TrainingSet, optimizer: torch.optim.Optimizer,
                batch_size: int, rng: np.random.Generator, device: torch.device,
                progress: Callable[[int, float], None] | None = None,
                extra_loss: Callable[[], torch.Tensor] | None = None) -> float:
    """One pass over `data`; returns the mean ESMM loss. `progress(examples_done, loss)` after each step;
    `extra_loss()` is added to each step's loss (e.g. FedProx's proximal term)."""
    model.train()
    total, seen = 0.0, 0
    for rows in batch_rows(data, batch_size, rng):
        loss = train_step(model, side, data, rows, optimizer, device, extra_loss)
        total += loss * len(rows)
        seen += len(rows)
        if progress:
            progress(len(rows), loss)
    return total / max(seen, 1)


@torch.no_grad()
def embed_catalog(model: ConversionModel, side: ItemSide, device: torch.device) -> torch.Tensor:
    """(N, D) embeddings of every catalog item with the current weights."""
    model.eval()
    n = len(side.numeric)
    parts = [side.encode(model, torch.arange(s, min(s + ENCODE_CHUNK, n)), device) for s in range(0, n, ENCODE_CHUNK)]
    return torch.cat(parts) if parts else torch.zeros(0, model.config.dim, device=device)


def history_inputs(history: np.ndarray, events: np.ndarray, age_hours: np.ndarray, target: np.ndarray,
                   slot: np.ndarray, signals: np.ndarray, device: torch.device) -> ScoreInputs:
    """The model's inputs from history arrays (B, L) (-1 = padding), targets (B,), slots (B,), 0 = unknown, and the
    pairs' signals (B, N_SIGNALS)."""
    return ScoreInputs(
        target=torch.from_numpy(target).to(device),
        history=torch.from_numpy(np.maximum(history, 0)).to(device),
        history_mask=torch.from_numpy(history >= 0).to(device),
        events=torch.from_numpy(events).to(device),
        age_hours=torch.from_numpy(age_hours).to(device),
        position=torch.from_numpy(slot).to(device),
        signals=torch.from_numpy(signals).to(device),
    )


def _inputs(data: TrainingSet, rows: np.ndarray, device: torch.device) -> ScoreInputs:
    return history_inputs(data.history_item[rows], data.history_event[rows], data.history_age_hours[rows],
                          data.item[rows], data.slot[rows], data.signals[rows], device)


@torch.no_grad()
def predict(model: ConversionModel, item_embeddings: torch.Tensor, data: TrainingSet,
            device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """pCTR and pCTCVR (N,) of every example, using catalog embeddings (N_items, D)."""
    model.eval()
    p_ctr, p_ctcvr = [], []
    for rows in batch_rows(data, EVAL_BATCH, None):
        ctr, cvr, _ = model.score(item_embeddings, _inputs(data, rows, device))
        p_ctr.append(torch.sigmoid(ctr).cpu())
        p_ctcvr.append((torch.sigmoid(ctr) * torch.sigmoid(cvr)).cpu())
    if not p_ctr:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return torch.cat(p_ctr).numpy(), torch.cat(p_ctcvr).numpy()


@torch.no_grad()
def rank_purchases(model: ConversionModel, item_embeddings: torch.Tensor, data: TrainingSet,
                   candidates: dict[int, np.ndarray], logs: dict[int, EventLog], device: torch.device) -> np.ndarray:
    """Rank (1-based) of the purchased item of each purchase example among its merchant's whole catalog
    (`candidates[merchant]` = catalog rows), scored by pCTCVR at an unknown position, each candidate with its
    signals from the merchant's log (`logs[merchant]`, catalog codes) at the example's time."""
    model.eval()
    ranks = []
    for merchant in np.unique(data.merchant):
        pool = torch.from_numpy(candidates[int(merchant)]).to(device)
        bought = np.flatnonzero((data.merchant == merchant) & (data.purchased > 0))
        per_step = max(1, RANK_PAIRS // max(len(pool), 1))
        for start in range(0, len(bought), per_step):
            rows = bought[start:start + per_step]
            signals = torch.from_numpy(logs[int(merchant)].grid(data.user[rows], candidates[int(merchant)],
                                                                data.timestamp[rows])).to(device)
            scores = model.score_candidates(item_embeddings, _inputs(data, rows, device), pool,
                                            signals).cpu().numpy()
            target_col = np.searchsorted(candidates[int(merchant)], data.item[rows])
            ranks.append(node_metrics.rank_of(scores[np.arange(len(rows)), target_col], scores))
    return np.concatenate(ranks) if ranks else np.zeros(0, np.int64)


def basket_scorer(model: ConversionModel, item_embeddings: torch.Tensor, device: torch.device
                  ) -> Callable[[BasketTask, np.ndarray], np.ndarray]:
    """The model as a next-basket ranker: pCTCVR of every candidate for each shopper, from the history at the
    cut (the same `histories` as training examples) and each candidate's signals at the cut (the same
    `EventLog.signals`, from the shopper's merchant's log), at an unknown position."""

    @torch.no_grad()
    def score(task: BasketTask, pool: np.ndarray) -> np.ndarray:
        model.eval()
        candidates = torch.from_numpy(pool).to(device)
        per_step = max(1, RANK_PAIRS // max(len(pool), 1))
        parts = []
        for start in range(0, len(task), per_step):
            rows = slice(start, start + per_step)
            shoppers = task.subset(np.arange(len(task))[rows])
            signals = shoppers.signals(pool)
            unknown = np.zeros(len(shoppers), np.int64)  # no target yet, no slot shown
            inputs = history_inputs(shoppers.history_item, shoppers.history_event, shoppers.history_age_hours,
                                    unknown, unknown, signals[:, 0], device)
            parts.append(model.score_candidates(item_embeddings, inputs, candidates,
                                                torch.from_numpy(signals).to(device)).double().cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, len(pool)))
    return score


def evaluation_sums(data: TrainingSet, p_ctr: np.ndarray, p_ctcvr: np.ndarray,
                    ranks: np.ndarray | None) -> metrics.MetricSums:
    """Mergeable metric sums of one set of predictions (and, if given, of full-catalog ranks)."""
    sums = node_metrics.prediction_sums(data.clicked, data.purchased, p_ctr, p_ctcvr, data.user)
    if ranks is not None:
        sums = metrics.combine(sums, node_metrics.ranking_sums(ranks))
    return sums


def model_sums(model: ConversionModel, side: ItemSide, data: TrainingSet, candidates: dict[int, np.ndarray],
               logs: dict[int, EventLog], device: torch.device, embeddings: torch.Tensor | None = None,
               rank: bool = True, basket: BasketTask | None = None) -> metrics.MetricSums:
    """Metric sums of the model on `data`: predictions and, with `rank`, full-catalog ranking: of each shopper's
    next basket when a `basket` task is given (purchase logs), else of each purchase (catalog embeddings computed
    here unless given)."""
    embeddings = embed_catalog(model, side, device) if embeddings is None else embeddings
    p_ctr, p_ctcvr = predict(model, embeddings, data, device)
    if rank and basket is not None:
        sums = evaluation_sums(data, p_ctr, p_ctcvr, None)
        return metrics.combine(sums, metrics.MetricSums(
            ranking_sums(basket, candidates, basket_scorer(model, embeddings, device))))
    ranks = rank_purchases(model, embeddings, data, candidates, logs, device) if rank else None
    return evaluation_sums(data, p_ctr, p_ctcvr, ranks)
