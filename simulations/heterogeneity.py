"""How alike a federation's clients are, from their data alone: how much of their catalogs and of their best sellers
they share. Federating helps a client most where the others' data says something about its own shoppers.

Per client c, with C_c its catalog (item ids of its items table) and T_c its `top` most purchased items (by purchase
events; ties broken by item id), over the other clients d:

  catalog shared       = |C_c ∩ (union of the C_d)| / |C_c|     the share of its catalog some other client also sells
  catalog Jaccard      = mean over d of |C_c ∩ C_d| / |C_c ∪ C_d|
  best sellers shared  = mean over d of |T_c ∩ T_d| / top        how far its best sellers are also the others'

Items are the same item where their item ids are equal (the same stock code in Online Retail; the shared "sku-"
items of the synthetic marketplace).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

TOP = 50
COLUMNS = ["merchant", "shoppers", "catalog items", "items bought", "catalog shared", "catalog Jaccard",
           "best sellers shared"]


def best_sellers(events: pd.DataFrame, top: int) -> set[str]:
    """The `top` items with the most purchase events (ties broken by item id)."""
    bought = events.loc[events["event"] == "purchase", "item_id"].astype(str)
    counts = bought.value_counts().rename_axis("item_id").reset_index(name="n")
    counts = counts.sort_values(["n", "item_id"], ascending=[False, True])
    return set(counts["item_id"].head(top))


def client_overlap(data_root: str | Path, top: int = TOP) -> pd.DataFrame:
    """One row per merchant folder under `data_root` (see the module's formulas); None where undefined (a single
    client, or a client without purchases)."""
    from fedcvr.shared.data.loader import load_merchant, merchant_folders

    if top < 1:
        raise ValueError(f"top = {top}: the number of best sellers to compare must be at least 1")
    clients = {}
    for folder in merchant_folders(data_root):
        data = load_merchant(folder)
        clients[folder.name] = (data, set(data.items["item_id"].astype(str)), best_sellers(data.events, top))
    rows = []
    for name, (data, catalog, sellers) in clients.items():
        others = [(c, t) for other, (_, c, t) in clients.items() if other != name]
        elsewhere = set().union(*(c for c, _ in others)) if others else set()
        purchases = data.events["event"] == "purchase"
        rows.append({
            "merchant": name,
            "shoppers": int(data.events["user_id"].nunique()),
            "catalog items": len(catalog),
            "items bought": int(data.events.loc[purchases, "item_id"].nunique()),
            "catalog shared": len(catalog & elsewhere) / len(catalog) if others and catalog else None,
            "catalog Jaccard": (sum(len(catalog & c) / len(catalog | c) for c, _ in others) / len(others)
                                if others else None),
            "best sellers shared": (sum(len(sellers & t) for _, t in others) / (len(others) * top)
                                    if others and sellers else None),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


CLIENTS = "clients.json"


def overlap_of_results(results: Path, data_root: str | None, top: int = TOP) -> pd.DataFrame | None:
    """The client overlap of a grid's results folder: read from `<results>/clients.json`, or computed from the grid's
    data folder (when it is on this machine) and written there so that the report needs no data the next time.
    None when neither is there."""
    path = results / CLIENTS
    if path.is_file():
        known = json.loads(path.read_text())
        overlap = pd.DataFrame(known["merchants"], columns=COLUMNS)
        overlap.attrs["top"] = int(known["top"])
        return overlap
    # the grid's data folder lies inside its results folder: look there too when the results were moved
    found = [Path(p) for p in (data_root, results / Path(data_root).name) if p] if data_root else []
    found = [p for p in found if p.is_dir()]
    if not found:
        return None
    overlap = client_overlap(found[0], top)
    path.write_text(json.dumps({"top": top, "merchants": overlap.to_dict(orient="records")}, indent=2) + "\n")
    overlap.attrs["top"] = top
    return overlap
