"""The item index a merchant serves from: the model's embedding of every catalog item, persisted next to the model.

Stage one of a recommendation retrieves candidates by dot product over the L2-normalised embeddings (`top`, plain
numpy: one matrix-vector product and an argpartition); stage two re-ranks them with the full model from the raw
embeddings. The index is saved as `<model-dir>/index/items.npz` with the model version and a digest of the
catalog it was built from; it is rebuilt when either changes (a new pushed-back model, a changed catalog).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedcvr.shared.model.encoder import Backbone
from fedcvr.shared.model.esmm import ConversionModel
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.training.data import Catalog
from fedcvr.shared.training.loop import ItemSide, embed_catalog

INDEX_DIR = "index"
INDEX_FILE = "items.npz"


def catalog_digest(catalog: Catalog) -> str:
    """Changes whenever an item is added, removed, or its text or price changes."""
    digest = hashlib.sha256()
    for item_id, text in zip(catalog.item_ids, catalog.texts, strict=True):
        digest.update(f"{item_id}\x1f{text}\x1e".encode())
    digest.update(np.ascontiguousarray(catalog.numeric).tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def embed(model: ConversionModel, backbone: Backbone, catalog: Catalog) -> np.ndarray:
    """(N, D) float32 embeddings of the catalog's items with the model's weights (from their text and price)."""
    if not len(catalog):
        return np.zeros((0, model.config.dim), np.float32)
    cache = PrefixCache(backbone, model.config.adapter_layers, model.config.max_text_tokens)
    side = ItemSide(cache.states(catalog.texts), torch.from_numpy(catalog.numeric), catalog.item_ids)
    return embed_catalog(model, side, torch.device("cpu")).numpy().astype(np.float32)


def index_stamp(folder: Path) -> tuple[int, int, int] | None:
    """What identifies the saved index file's current version (inode, mtime, size; a save replaces the file), or
    None when there is none: worker processes serving one model folder compare it to see another's write."""
    try:
        stat = os.stat(folder / INDEX_FILE)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on `<folder>/.write.lock` across processes (released when the block ends or the process
    dies), so that writes of worker processes to one index folder happen one after another."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder / ".write.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _unit(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return np.ascontiguousarray(embeddings / np.maximum(norms, 1e-12), dtype=np.float32)


@dataclass
class ItemIndex:
    """Item ids, raw embeddings (N, D) for re-ranking and unit embeddings (N, D) for retrieval and similarity."""

    item_ids: np.ndarray
    embeddings: np.ndarray
    version: str
    digest: str
    unit: np.ndarray = field(init=False)
    position: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=object)
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        self.unit = _unit(self.embeddings)
        self.position = {str(item): i for i, item in enumerate(self.item_ids)}

    def __len__(self) -> int:
        return len(self.item_ids)

    @classmethod
    def build(cls, model: ConversionModel, backbone: Backbone, catalog: Catalog, version: str) -> ItemIndex:
        return cls(catalog.item_ids, embed(model, backbone, catalog), version, catalog_digest(catalog))

    def save(self, folder: Path) -> Path:
        """Write `<folder>/items.npz` atomically (a temporary file renamed over the old one)."""
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=folder, suffix=".npz")
        os.close(handle)
        np.savez(tmp, item_ids=self.item_ids.astype(str), embeddings=self.embeddings,
                 version=np.array(self.version), digest=np.array(self.digest))
        os.replace(tmp, folder / INDEX_FILE)
        return folder / INDEX_FILE

    @classmethod
    def load(cls, folder: Path) -> ItemIndex | None:
        """The saved index, or None when there is none or it cannot be read (it is then rebuilt)."""
        path = folder / INDEX_FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                return cls(saved["item_ids"].astype(object), saved["embeddings"], str(saved["version"]),
                           str(saved["digest"]))
        except (OSError, ValueError, KeyError):
            return None

    @classmethod
    def load_or_build(cls, folder: Path, model: ConversionModel, backbone: Backbone, catalog: Catalog,
                      version: str) -> tuple[ItemIndex, bool]:
        """The saved index if it matches this model version and catalog, else a new one (saved). -> (index, built)"""
        saved = cls.load(folder)
        if saved is not None and saved.version == version and saved.digest == catalog_digest(catalog):
            return saved, False
        index = cls.build(model, backbone, catalog, version)
        index.save(folder)
        return index, True

    def upsert(self, item_ids: list[str], embeddings: np.ndarray, digest: str) -> ItemIndex:
        """A new index with these items added or replaced (the old one stays valid for readers in flight)."""
        ids = list(self.item_ids)
        rows = self.embeddings.copy()
        extra_ids, extra_rows = [], []
        for item, vector in zip(item_ids, embeddings, strict=True):
            if item in self.position:
                rows[self.position[item]] = vector
            else:
                extra_ids.append(item)
                extra_rows.append(vector)
        if extra_rows:
            ids += extra_ids
            rows = np.concatenate([rows, np.asarray(extra_rows, np.float32)])
        return ItemIndex(np.asarray(ids, dtype=object), rows, self.version, digest)

    def top(self, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The `k` rows with the largest dot product with the unit `query` (among `allowed` rows when given),
        best first -> (rows, scores)."""
        scores = self.unit @ query
        if allowed is not None:
            scores = np.where(allowed, scores, -np.inf)
        k = min(k, len(scores))
        if k <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        rows = rows[np.argsort(-scores[rows], kind="stable")]
        rows = rows[np.isfinite(scores[rows])]
        return rows, scores[rows]
