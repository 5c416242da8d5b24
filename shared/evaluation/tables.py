"""The next-basket table: one row per ranker (the model, each baseline), each metric with its 95% interval."""

from __future__ import annotations

from collections.abc import Mapping

from .basket_metrics import METRICS, PREFIX

VARIANT_TITLES = {"all": "every item", "new": "new items (items bought before the cut left out)"}
HEADER = ("ranker", "shoppers", *(name.upper().replace("RECALL", "Recall") for name in METRICS))


def cell(metrics: Mapping[str, object], variant: str, name: str) -> str:
    """'0.1234 [0.1101, 0.1372]' (mean and bootstrap 95% interval), or 'n/a'."""
    base = f"{PREFIX}.{variant}.{name}"
    mean, lo, hi = metrics.get(base), metrics.get(f"{base}.lo"), metrics.get(f"{base}.hi")
    if mean is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{float(mean):.4f}"
    return f"{float(mean):.4f} [{float(lo):.4f}, {float(hi):.4f}]"


def rows(rankers: list[tuple[str, Mapping[str, object]]], variant: str) -> list[list[str]]:
    """Table rows (ranker, shoppers, one cell per metric) of `rankers` = [(label, finalised metrics), ...]."""
    out = []
    for label, metrics in rankers:
        n = metrics.get(f"{PREFIX}.{variant}.n")
        out.append([label, "n/a" if n is None else f"{int(n):,}", *(cell(metrics, variant, m) for m in METRICS)])
    return out


def markdown(rankers: list[tuple[str, Mapping[str, object]]], variant: str) -> str:
    """The table as Markdown."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(rankers, variant)]
    return "\n".join(lines)
