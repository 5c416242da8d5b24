"""The embedded default data: a synthetic marketplace of merchants with a hidden ground-truth shopper model.

`generate_marketplace(config, out)` writes one contract folder per merchant (`merchant-01`, ...) and a
`marketplace.json` describing the run. Everything is drawn from `numpy.random.default_rng` seeded by
(seed, purpose, merchant, chunk), so the same config gives the same bytes of data.

World
  Items carry a category, noun, brand, qualifier (Essential ... Pro), colour, material and size; title and
  description are composed from these words (see vocab.py), so the text carries the signal.
  Item latent quality = qualifier tier + brand quality + noise; price = category reference price x qualifier
  factor x brand premium x merchant price level x noise.
Shoppers (per merchant)
  Each shopper follows one of 16 marketplace-wide personas (taste archetypes), drawn from the merchant's persona
  mix ~ Dirichlet(0.7). A persona has an interest over categories ~ Dirichlet(0.3), colour and material
  preferences ~ N(0, 1) and a price sensitivity ~ LogNormal(0, 0.5). The shopper's own interest =
  0.8 x the persona's + 0.2 x Dirichlet(0.5); own colour and material preferences = the persona's + N(0, 0.35);
  own price sensitivity = the persona's x LogNormal(0, 0.175); activity ~ LogNormal(0, 0.8).
Sessions
  Each session shows a slate of 6-12 items at positions 1..k: each slot's category comes from the shopper's
  interest (60%) or the merchant's mix (40%), its item from that category by popularity.
Ground truth, per impression of item i to shopper u at position p
  utility   = 1.0 log(C interest[u, cat]) + 0.6 colour_pref[u, colour] + 0.5 material_pref[u, material]
              + 0.8 quality[i] - 0.6 price_sens[u] log(price / reference price)
  P(click)  = sigmoid(-3.0 + ctr_level[m] + 0.8 utility - 0.5 log(p))
  P(purchase | click) = sigmoid(-1.6 + cvr_level[m] + 0.5 utility - 0.8 price_sens[u] log(price / reference))
  A purchase implies a click and a cart; a click without purchase adds a cart with probability 0.2.
  Impression rows store `true_p_click` and `true_p_purchase` (= P(click) x P(purchase | click)).
Merchants (non-IID)
  size share ~ Zipf(1) x LogNormal(0, 0.5) (heavy-tailed), category mix ~ Dirichlet(0.5),
  price level ~ LogNormal(0, 0.3), ctr_level ~ N(0, 0.3), cvr_level ~ N(0, 0.5).
  A pool of `shared_fraction` of the items (ids `sku-...`) is sold by 1-3 merchants each, chosen by their
  category mix, each at its own price; the rest (ids `m01-...`) belong to one merchant.
Events are streamed to Parquet in chunks of shoppers, so 100 merchants and 10M events fit in bounded memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .vocab import CATEGORIES, COLOURS, QUALIFIERS

SLATE_MIN, SLATE_MAX = 6, 12
INTEREST_SHARE = 0.6
PERSONAS = 16  # shopper archetypes shared by the whole marketplace
OWN_TASTE = 0.2  # weight of a shopper's own category interest next to its persona's
OWN_SPREAD = 0.35  # spread of a shopper's own colour and material preferences around its persona's
EVENTS_PER_IMPRESSION = 1.1  # impressions plus the clicks, carts and purchases they lead to (measured ~1.1)
MIN_ITEMS_PER_MERCHANT = 20
MIN_SHOPPERS_PER_MERCHANT = 10
EVENTS_PER_CHUNK = 250_000  # shoppers are simulated in chunks of about this many events

EVENT_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("item_id", pa.string()), ("event", pa.string()),
    ("timestamp", pa.timestamp("ns")), ("session_id", pa.string()), ("position", pa.int32()),
    ("true_p_click", pa.float32()), ("true_p_purchase", pa.float32()),
])


@dataclass(frozen=True)
class SynthConfig:
    """Size and seed of a synthetic marketplace; errors name the option and the fix."""

    merchants: int = 5
    items: int = 2000
    shoppers: int = 5000
    events: int = 200_000
    seed: int = 0
    shared_fraction: float = 0.1
    days: int = 90
    start: str = "2024-01-01"

    def __post_init__(self) -> None:
        if self.merchants < 1:
            raise ValueError(f"--merchants must be at least 1, got {self.merchants}")
        if self.items < MIN_ITEMS_PER_MERCHANT * self.merchants:
            raise ValueError(f"--items {self.items} is too small for {self.merchants} merchants: "
                             f"use at least {MIN_ITEMS_PER_MERCHANT * self.merchants}")
        if self.shoppers < MIN_SHOPPERS_PER_MERCHANT * self.merchants:
            raise ValueError(f"--shoppers {self.shoppers} is too small for {self.merchants} merchants: "
                             f"use at least {MIN_SHOPPERS_PER_MERCHANT * self.merchants}")
        if self.events < 10 * self.shoppers:
            raise ValueError(f"--events {self.events} is too small for {self.shoppers} shoppers: "
                             f"use at least {10 * self.shoppers} (about 10 per shopper)")
        if not 0.0 <= self.shared_fraction < 1.0:
            raise ValueError(f"shared_fraction must be in [0, 1), got {self.shared_fraction}")
        if self.days < 1:
            raise ValueError(f"days must be at least 1, got {self.days}")


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _split(total: int, shares: np.ndarray, minimum: int) -> np.ndarray:
    """Integer counts summing to `total`, proportional to `shares`, each at least `minimum`."""
    spare = total - minimum * len(shares)
    raw = shares / shares.sum() * spare
    counts = np.floor(raw).astype(int)
    counts[np.argsort(raw - counts)[::-1][: spare - counts.sum()]] += 1
    return counts + minimum


@dataclass
class _World:
    """Marketplace-wide latent structure: brands, merchants and the catalog attributes."""

    brand_quality: list[np.ndarray]  # per category, (n_brands,)
    share: np.ndarray  # (M,)
    mix: np.ndarray  # (M, C)
    price_level: np.ndarray  # (M,)
    ctr_level: np.ndarray  # (M,)
    cvr_level: np.ndarray  # (M,)
    persona_mix: np.ndarray  # (M, P) how common each shopper persona is at each merchant
    persona_interest: np.ndarray  # (P, C)
    persona_colour: np.ndarray  # (P, colours)
    persona_material: np.ndarray  # (P, materials)
    persona_price: np.ndarray  # (P,) price sensitivity


def _make_world(config: SynthConfig) -> _World:
    rng = _rng(config.seed, 0)
    n_cat, m = len(CATEGORIES), config.merchants
    brand_quality = [rng.normal(0.0, 0.5, len(c.brands)) for c in CATEGORIES]
    share = (1.0 / np.arange(1, m + 1)) * rng.lognormal(0.0, 0.5, m)
    return _World(
        brand_quality=brand_quality,
        share=share / share.sum(),
        mix=rng.dirichlet(np.full(n_cat, 0.5), m),
        price_level=rng.lognormal(0.0, 0.3, m),
        ctr_level=rng.normal(0.0, 0.3, m),
        cvr_level=rng.normal(0.0, 0.5, m),
        persona_mix=rng.dirichlet(np.full(PERSONAS, 0.7), m),
        persona_interest=rng.dirichlet(np.full(n_cat, 0.3), PERSONAS),
        persona_colour=rng.normal(0.0, 1.0, (PERSONAS, len(COLOURS))),
        persona_material=rng.normal(0.0, 1.0, (PERSONAS, _MATERIAL_OFFSET[-1])),
        persona_price=rng.lognormal(0.0, 0.5, PERSONAS),
    )


_MATERIAL_OFFSET = np.cumsum([0] + [len(c.materials) for c in CATEGORIES])


def _make_items(rng: np.random.Generator, categories: np.ndarray, world: _World) -> pd.DataFrame:
    """Attributes, text and base price of items of the given categories (one row each)."""
    n = len(categories)
    cols: dict[str, np.ndarray] = {k: np.zeros(n, dtype=np.int64) for k in
                                   ("noun", "material", "brand", "size", "colour")}
    quality = np.zeros(n)
    price = np.zeros(n)
    qualifier = rng.integers(0, len(QUALIFIERS), n)
    q_tier = np.array([q[1] for q in QUALIFIERS])[qualifier]
    q_factor = np.array([q[2] for q in QUALIFIERS])[qualifier]
    for c, vocab in enumerate(CATEGORIES):
        idx = np.flatnonzero(categories == c)
        k = len(idx)
        cols["noun"][idx] = rng.integers(0, len(vocab.nouns), k)
        cols["material"][idx] = rng.integers(0, len(vocab.materials), k)
        cols["brand"][idx] = rng.integers(0, len(vocab.brands), k)
        cols["size"][idx] = rng.integers(0, len(vocab.sizes), k)
        cols["colour"][idx] = rng.integers(0, len(COLOURS), k) if vocab.has_colour else -1
        bq = world.brand_quality[c][cols["brand"][idx]]
        quality[idx] = q_tier[idx] + bq + rng.normal(0.0, 0.3, k)
        price[idx] = vocab.reference_price * q_factor[idx] * np.exp(0.3 * bq) * rng.lognormal(0.0, 0.35, k)
    titles, descriptions = [], []
    for i in range(n):
        vocab = CATEGORIES[categories[i]]
        qual = QUALIFIERS[qualifier[i]][0]
        noun, material = vocab.nouns[cols["noun"][i]], vocab.materials[cols["material"][i]]
        brand, size = vocab.brands[cols["brand"][i]], vocab.sizes[cols["size"][i]]
        colour = COLOURS[cols["colour"][i]] if cols["colour"][i] >= 0 else ""
        words = [brand, qual, colour, material, noun]
        titles.append(" ".join(w for w in words if w) + f", {size}")
        colour_part = f" in {colour}" if colour else ""
        use = vocab.uses[(i + cols["noun"][i]) % len(vocab.uses)]
        tone = ("Built to last, with a finish you will notice." if q_tier[i] >= 0.4 else
                "Simple, practical and easy on the budget." if q_tier[i] < 0 else
                "A dependable choice for every day.")
        made_of = vocab.material_phrase.format(material)
        descriptions.append(f"A {qual.lower()} {noun} by {brand}, {made_of}{colour_part}. "
                            f"Great for {use}. {tone}")
    return pd.DataFrame({
        "category": categories, "noun": cols["noun"], "brand_idx": cols["brand"], "colour": cols["colour"],
        "material": _MATERIAL_OFFSET[categories] + cols["material"], "quality": quality, "base_price": price,
        "title": titles, "description": descriptions,
        "brand": [CATEGORIES[c].brands[b] for c, b in zip(categories, cols["brand"])],
        "category_name": [CATEGORIES[c].name for c in categories],
    })


def _make_catalogs(config: SynthConfig, world: _World) -> list[pd.DataFrame]:
    """One catalog per merchant: its own items plus the shared items it sells, priced by the merchant."""
    rng = _rng(config.seed, 1)
    m = config.merchants
    n_shared = int(round(config.items * config.shared_fraction))
    n_own = _split(config.items - n_shared, world.share ** 0.7, MIN_ITEMS_PER_MERCHANT)
    catalogs = []
    for j in range(m):
        cats = rng.choice(len(CATEGORIES), n_own[j], p=world.mix[j])
        items = _make_items(rng, cats, world)
        items["item_id"] = [f"m{j + 1:0{len(str(m))}d}-{k:06d}" for k in range(n_own[j])]
        catalogs.append(items)
    if n_shared:
        pool_mix = world.mix.mean(axis=0)
        shared = _make_items(rng, rng.choice(len(CATEGORIES), n_shared, p=pool_mix), world)
        shared["item_id"] = [f"sku-{k:06d}" for k in range(n_shared)]
        sellers = rng.integers(1, min(m, 3) + 1, n_shared)
        carried: list[list[int]] = [[] for _ in range(m)]
        for k in range(n_shared):
            weight = world.mix[:, shared["category"].iat[k]] + 1e-3
            for j in rng.choice(m, sellers[k], replace=False, p=weight / weight.sum()):
                carried[j].append(k)
        catalogs = [pd.concat([own, shared.iloc[carried[j]]], ignore_index=True) for j, own in enumerate(catalogs)]
    for j, items in enumerate(catalogs):
        noise = _rng(config.seed, 2, j).lognormal(0.0, 0.1, len(items))
        items["price"] = np.round(items["base_price"] * world.price_level[j] * noise, 2)
        items["popularity"] = _rng(config.seed, 3, j).lognormal(0.0, 1.0, len(items))
    return catalogs


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _simulate_chunk(rng: np.random.Generator, j: int, merchant: str, first_user: int, n_users: int,
                    mean_sessions: float, items: pd.DataFrame, world: _World, config: SynthConfig) -> pa.Table:
    """Shoppers first_user .. first_user + n_users - 1 of merchant j: their sessions as a table of events."""
    n_cat = len(CATEGORIES)
    persona = rng.choice(len(world.persona_price), n_users, p=world.persona_mix[j])
    interest = (1 - OWN_TASTE) * world.persona_interest[persona] + OWN_TASTE * rng.dirichlet(np.full(n_cat, 0.5),
                                                                                             n_users)
    colour_pref = world.persona_colour[persona] + rng.normal(0.0, OWN_SPREAD, (n_users, len(COLOURS)))
    material_pref = world.persona_material[persona] + rng.normal(0.0, OWN_SPREAD, (n_users, _MATERIAL_OFFSET[-1]))
    price_sens = world.persona_price[persona] * rng.lognormal(0.0, OWN_SPREAD / 2, n_users)
    activity = rng.lognormal(0.0, 0.8, n_users)
    n_sessions = 1 + rng.poisson(np.maximum(mean_sessions * activity / np.exp(0.32) - 1, 0))

    session_user = np.repeat(np.arange(n_users), n_sessions)
    n_sess_total = len(session_user)
    span = config.days * 86_400
    session_start = rng.integers(0, span - 3_600, n_sess_total)
    slate = rng.integers(SLATE_MIN, SLATE_MAX + 1, n_sess_total)
    slot_session = np.repeat(np.arange(n_sess_total), slate)
    position = np.arange(len(slot_session)) - np.repeat(np.cumsum(slate) - slate, slate) + 1
    user = session_user[slot_session]

    # slot category: shopper interest or the merchant's mix, restricted to categories the merchant sells
    cat_of_item = items["category"].to_numpy()
    available = np.bincount(cat_of_item, minlength=n_cat) > 0
    probs = (INTEREST_SHARE * interest[user] + (1 - INTEREST_SHARE) * world.mix[j]) * available
    cdf = np.cumsum(probs / probs.sum(axis=1, keepdims=True), axis=1)
    cat = np.minimum((cdf < rng.random(len(user))[:, None]).sum(axis=1), n_cat - 1)
    cat = np.where(available[cat], cat, np.argmax(available))
    item = np.zeros(len(user), dtype=np.int64)
    popularity = items["popularity"].to_numpy()
    for c in np.flatnonzero(available):
        members = np.flatnonzero(cat_of_item == c)
        slots = np.flatnonzero(cat == c)
        w = np.cumsum(popularity[members])
        item[slots] = members[np.minimum(np.searchsorted(w, rng.random(len(slots)) * w[-1]), len(w) - 1)]
    keep = ~pd.DataFrame({"s": slot_session, "i": item}).duplicated().to_numpy()
    user, item, slot_session, position = user[keep], item[keep], slot_session[keep], position[keep]

    # hidden ground truth
    reference = np.array([c.reference_price for c in CATEGORIES])[cat_of_item[item]]
    log_price = np.log(items["price"].to_numpy()[item] / reference)
    colour = items["colour"].to_numpy()[item]
    utility = (np.log(n_cat * interest[user, cat_of_item[item]])
               + 0.6 * np.where(colour >= 0, colour_pref[user, np.maximum(colour, 0)], 0.0)
               + 0.5 * material_pref[user, items["material"].to_numpy()[item]]
               + 0.8 * items["quality"].to_numpy()[item]
               - 0.6 * price_sens[user] * log_price)
    p_click = _sigmoid(-3.0 + world.ctr_level[j] + 0.8 * utility - 0.5 * np.log(position))
    p_cvr = _sigmoid(-1.6 + world.cvr_level[j] + 0.5 * utility - 0.8 * price_sens[user] * log_price)
    click = rng.random(len(user)) < p_click
    purchase = click & (rng.random(len(user)) < p_cvr)
    cart = purchase | (click & (rng.random(len(user)) < 0.2))

    t_imp = session_start[slot_session] + 3 * (position - 1)
    t_click = t_imp + 2 + rng.exponential(20.0, len(user)).astype(np.int64)
    t_cart = t_click + 10 + rng.exponential(60.0, len(user)).astype(np.int64)
    t_buy = t_cart + 30 + rng.exponential(300.0, len(user)).astype(np.int64)

    width = len(str(config.merchants))
    user_ids = np.array([f"m{j + 1:0{width}d}-u{first_user + u:07d}" for u in range(n_users)], dtype=object)
    session_ids = np.array([f"m{j + 1:0{width}d}-s{first_user:07d}-{s:06d}" for s in range(n_sess_total)],
                           dtype=object)
    item_ids = items["item_id"].to_numpy(dtype=object)
    start_ns = pd.Timestamp(config.start).value
    parts = []
    for name, mask, times in (("impression", np.ones(len(user), bool), t_imp), ("click", click, t_click),
                              ("cart", cart, t_cart), ("purchase", purchase, t_buy)):
        is_imp = name == "impression"
        parts.append(pd.DataFrame({
            "user_id": user_ids[user[mask]], "item_id": item_ids[item[mask]], "event": name,
            "timestamp": pd.to_datetime(start_ns + times[mask] * 1_000_000_000),
            "session_id": session_ids[slot_session[mask]], "position": position[mask].astype(np.int32),
            "true_p_click": (p_click[mask] if is_imp else np.full(mask.sum(), np.nan)).astype(np.float32),
            "true_p_purchase": ((p_click * p_cvr)[mask] if is_imp else np.full(mask.sum(), np.nan)
                                ).astype(np.float32),
        }))
    frame = pd.concat(parts, ignore_index=True).sort_values(["timestamp", "user_id"], kind="stable")
    return pa.Table.from_pandas(frame, schema=EVENT_SCHEMA, preserve_index=False)


def generate_marketplace(config: SynthConfig, out: str | Path,
                         progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the marketplace under `out` and return its description (also saved as marketplace.json).

    `progress(events_written, events_planned)` is called after each chunk of shoppers.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = _make_world(config)
    catalogs = _make_catalogs(config, world)
    n_users = _split(config.shoppers, world.share, MIN_SHOPPERS_PER_MERCHANT)
    mean_sessions = config.events / EVENTS_PER_IMPRESSION / ((SLATE_MIN + SLATE_MAX) / 2) / config.shoppers
    users_per_chunk = max(1, int(EVENTS_PER_CHUNK / (config.events / config.shoppers)))
    width = max(2, len(str(config.merchants)))
    merchants, written = [], 0
    for j in range(config.merchants):
        name = f"merchant-{j + 1:0{width}d}"
        folder = out / name
        folder.mkdir(exist_ok=True)
        items = catalogs[j]
        items[["item_id", "title", "description", "category_name", "brand", "price"]].rename(
            columns={"category_name": "category"}).to_parquet(folder / "items.parquet", index=False)
        counts = dict.fromkeys(("impression", "click", "cart", "purchase"), 0)
        tmp = folder / ".events.parquet.tmp"
        with pq.ParquetWriter(tmp, EVENT_SCHEMA) as writer:
            for chunk, first in enumerate(range(0, n_users[j], users_per_chunk)):
                size = min(users_per_chunk, n_users[j] - first)
                table = _simulate_chunk(_rng(config.seed, 4, j, chunk), j, name, first, size, mean_sessions,
                                        items, world, config)
                writer.write_table(table)
                for event, n in zip(*np.unique(table.column("event").to_numpy(zero_copy_only=False),
                                               return_counts=True)):
                    counts[str(event)] += int(n)
                written += table.num_rows
                if progress:
                    progress(written, config.events)
        tmp.replace(folder / "events.parquet")
        merchants.append({
            "name": name, "shoppers": int(n_users[j]), "items": len(items),
            "shared_items": int(items["item_id"].str.startswith("sku-").sum()), "events": counts,
            "category_mix": {c.name: round(float(p), 4) for c, p in zip(CATEGORIES, world.mix[j])},
            "price_level": round(float(world.price_level[j]), 4),
            "ctr_level": round(float(world.ctr_level[j]), 4), "cvr_level": round(float(world.cvr_level[j]), 4),
        })
    description = {"generator": "fedcvr synthetic marketplace", "config": asdict(config), "merchants": merchants}
    (out / "marketplace.json").write_text(json.dumps(description, indent=2))
    return description
