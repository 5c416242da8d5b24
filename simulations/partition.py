"""Who holds which data in an experiment: the natural partition (one client per merchant or country folder), only
the folders with enough shoppers, at most so many shoppers per folder, or a Dirichlet(alpha) re-partition by category.

`cap_shoppers`: a folder with more than `max_shoppers` distinct shoppers keeps a random sample of that many (drawn
with a fixed seed from its shoppers ordered by their events, `shopper_order`: never by their ids, which are
pseudonyms made anew at each import) with all their events, and its whole catalog; smaller folders are linked as
they are. Shoppers are the privacy unit, so a shopper is kept or left out whole.

`dirichlet_partition`: all merchants' items and events are pooled; for every category c, client shares
p_c ~ Dirichlet(alpha x 1) are drawn and each item of c goes to client k with probability p_c[k]; an item's
events go with it. Small alpha gives clients few categories each (strongly non-IID), large alpha about the same
mix everywhere. A shopper whose events fall to several clients is a separate shopper at each (as across
merchants).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from fedcvr.shared.data.loader import load_merchant, merchant_folders
from fedcvr.shared.data.writer import write_merchant


def folder_counts(folder: Path) -> dict[str, int]:
    """{"events", "shoppers", "items"} of one merchant folder, read from its Parquet columns where it has them
    (without loading the whole folder)."""
    if (folder / "events.parquet").is_file() and (folder / "items.parquet").is_file():
        users = pd.read_parquet(folder / "events.parquet", columns=["user_id"])["user_id"]
        items = len(pd.read_parquet(folder / "items.parquet", columns=["item_id"]))
    else:
        data = load_merchant(folder)
        users, items = data.events["user_id"], len(data.items)
    return {"events": len(users), "shoppers": int(users.nunique()), "items": items}


def select_merchants(root: Path, min_shoppers: int, out: Path) -> Path:
    """A marketplace folder `out` of links to the merchant folders of `root` with at least `min_shoppers`
    distinct shoppers; ValueError when fewer than 2 remain."""
    chosen = [folder for folder in merchant_folders(root) if folder_counts(folder)["shoppers"] >= min_shoppers]
    if len(chosen) < 2:
        raise ValueError(f"only {len(chosen)} merchant folder(s) of {root} have at least {min_shoppers} shoppers: "
                         "lower min-shoppers")
    out.mkdir(parents=True, exist_ok=True)
    for folder in chosen:
        link = out / folder.name
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    return out


def shopper_order(events: pd.DataFrame) -> np.ndarray:
    """The shoppers of one merchant's events in an order set by their events alone, never by their ids: by the time
    of their first event, ties broken by a SHA-256 digest of all their events (time, item, event type and session,
    sorted). Shopper ids are pseudonyms under a key made anew at each import, so an order by id would draw other
    shoppers from each import of the same file."""
    line = (events["timestamp"].astype(str) + "\x1f" + events["item_id"].astype(str) + "\x1f"
            + events["event"].astype(str))
    if "session_id" in events.columns:
        line = line + "\x1f" + events["session_id"].astype("string").fillna("").astype(str)
    frame = pd.DataFrame({"user": events["user_id"].astype(str).to_numpy(), "line": line.to_numpy(),
                          "t": events["timestamp"].to_numpy()})
    grouped = frame.groupby("user", sort=False)
    order = pd.DataFrame({
        "first": grouped["t"].min(),
        "digest": grouped["line"].agg(lambda lines: hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()),
    })
    return order.sort_values(["first", "digest"], kind="stable").index.to_numpy()


def cap_shoppers(root: Path, max_shoppers: int, out: Path, seed: int = 0) -> Path:
    """A marketplace folder `out` holding every merchant folder of `root`, those with more than `max_shoppers`
    shoppers cut down to a random `max_shoppers` of them (see the module text); returns `out`."""
    if max_shoppers < 1:
        raise ValueError(f"max-shoppers must be >= 1, got {max_shoppers}")
    out.mkdir(parents=True, exist_ok=True)
    for folder in merchant_folders(root):
        target = out / folder.name
        if target.exists():
            continue
        data = load_merchant(folder)
        if data.events["user_id"].nunique() <= max_shoppers:
            target.symlink_to(folder.resolve(), target_is_directory=True)
            continue
        shoppers = shopper_order(data.events)  # only where a sample is drawn
        kept = np.random.default_rng(seed).choice(shoppers, size=max_shoppers, replace=False)
        events = data.events[data.events["user_id"].astype(str).isin(set(kept))].reset_index(drop=True)
        staging = out / f".{folder.name}.tmp"
        write_merchant(staging, data.items.reset_index(drop=True), events)
        staging.replace(target)  # whole folders only: an interrupted cut is redone
    return out


def dirichlet_partition(root: Path, out: Path, alpha: float, clients: int, seed: int = 0) -> Path:
    """Write `clients` merchant folders `client-NN` into `out` (see the module text); returns `out`."""
    if not alpha > 0 or clients < 2:
        raise ValueError(f"a Dirichlet partition needs alpha > 0 and at least 2 clients, got alpha = {alpha}, "
                         f"clients = {clients}")
    data = [load_merchant(folder) for folder in merchant_folders(root)]
    items = pd.concat([d.items for d in data], ignore_index=True).drop_duplicates("item_id")
    events = pd.concat([d.events for d in data], ignore_index=True)
    if "category" not in items:
        items["category"] = ""
    rng = np.random.default_rng(seed)
    owner = pd.Series(0, index=items["item_id"].to_numpy())
    for _, group in items.groupby(items["category"].fillna(""), sort=True):
        shares = rng.dirichlet(np.full(clients, alpha))
        owner[group["item_id"].to_numpy()] = rng.choice(clients, size=len(group), p=shares)
    out.mkdir(parents=True, exist_ok=True)
    for k in range(clients):
        mine = set(owner.index[owner.to_numpy() == k])
        client_items = items[items["item_id"].isin(mine)]
        client_events = events[events["item_id"].isin(mine)]
        if client_items.empty or client_events.empty:
            raise ValueError(f"client {k + 1} of the Dirichlet(alpha = {alpha}) partition got no items or no "
                             "events: raise alpha or use fewer clients")
        write_merchant(out / f"client-{k + 1:02d}", client_items.reset_index(drop=True),
                       client_events.reset_index(drop=True))
    return out
