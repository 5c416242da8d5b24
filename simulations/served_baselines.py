"""Each merchant's served model beside the classic baselines it could fit alone, on its shoppers' next baskets.

After a federation every merchant serves the pushed-back model from its own folder (`RUN/models/NAME`: the global
weights with, under `personalise`, its own local layers). For each merchant: the shoppers with history before its
test cut are asked for their first basket at or after it, and its whole catalog is ranked (as
`docs/evaluation.md` states; on logs with impressions too, from the purchases in them) by that served model and by
each classic baseline fitted on the merchant's own purchases before the cut (its setting tuned on the validation
cut). Sums are merged over merchants, then finalised: one table over all the merchants' shoppers. Nothing here
pools data across merchants; it is the comparison each merchant could make on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.evaluation import BASELINES, basket_metrics
from fedcvr.shared.evaluation.baselines import BaselineConfig
from fedcvr.shared.evaluation.next_basket import ranking_sums, run_baselines
from fedcvr.shared.model.folder import WEIGHTS, load_model_folder
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.training.loop import ItemSide, basket_scorer, embed_catalog
from fedcvr.shared.training.prepare import prepare


def served_vs_baselines(run_dir: Path, folders: list[Path], names: tuple[str, ...] = BASELINES,
                        say: Callable[[str], None] | None = None) -> list[tuple[str, dict]]:
    """[(label, finalised next-basket metrics)]: the merchants' served models first, then each baseline (local);
    empty when no merchant saved a model or has test shoppers."""
    device = torch.device("cpu")
    served: dict = {}
    fitted: dict[str, dict] = {}
    personalised = False
    for folder in folders:
        model_dir = Path(run_dir) / "models" / folder.name
        if not (model_dir / WEIGHTS).is_file():
            continue
        if say:
            say(f"next baskets of {folder.name}: its served model and its own baselines")
        model, backbone, settings = load_model_folder(model_dir)
        model.eval()
        personalised = personalised or model.memory is not None
        examples = ExampleConfig.defaults(**settings.get("examples", {}))
        prepared = prepare([load_merchant(folder)], examples, next_basket=True)
        task = prepared.baskets.get("test")
        if task is None or not len(task):
            continue
        cache = PrefixCache(backbone, model.config.adapter_layers, model.config.max_text_tokens)
        side = ItemSide(cache.states(prepared.catalog.texts), torch.from_numpy(prepared.catalog.numeric),
                        prepared.catalog.item_ids)
        scorer = basket_scorer(model, embed_catalog(model, side, device), device)
        served = basket_metrics.add(served, ranking_sums(task, prepared.candidates, scorer))
        for result in run_baselines(list(names), prepared, BaselineConfig.defaults(), "local", backbone,
                                    model.config.max_text_tokens):
            fitted[result.name] = basket_metrics.add(fitted.get(result.name, {}), result.sums)
    if not served:
        return []
    label = "served model (global + local)" if personalised else "served model (global)"
    return [(label, basket_metrics.finalise(served))] + [
        (f"{name} (local)", basket_metrics.finalise(sums)) for name, sums in fitted.items()]
