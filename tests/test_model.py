"""The conversion model: encoder with adapters and its prefix cache, user tower, ESMM head, weights, config."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_tiny_bert
from fedcvr.shared.data.examples import ExampleConfig
from fedcvr.shared.data.signals import N_SIGNALS, repeat_prior
from fedcvr.shared.model import prefix_cache as prefix_module
from fedcvr.shared.model.config import ModelConfig, TrainConfig
from fedcvr.shared.model.encoder import BottleneckAdapter, load_backbone, masked_mean
from fedcvr.shared.model.errors import ModelConfigError
from fedcvr.shared.model.esmm import ConversionModel, ScoreInputs, esmm_loss
from fedcvr.shared.model.folder import load_model_folder, save_model_folder
from fedcvr.shared.model.memory import ItemMemory, load_memory, save_memory
from fedcvr.shared.model.prefix_cache import PrefixCache
from fedcvr.shared.model.weights import load_trainable_state, trainable_state

TEXTS = ["Nordvik Premium navy wool sweater, size M. A premium sweater by Nordvik. Nordvik. Clothing",
         "Voltra Pro black aluminium headphones, standard", "Harvest Lane organic honey, 500 g. Grocery",
         "Pawsome Classic red rope chew toy, small"]


@pytest.fixture(scope="module")
def backbone(tiny_bert):
    return load_backbone(str(tiny_bert))


def full_model_embedding(backbone, texts):
    tokens = backbone.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return masked_mean(backbone.model(**tokens).last_hidden_state, tokens["attention_mask"])


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_cached_prefix_plus_fresh_adapters_equals_the_full_backbone(backbone, tmp_path, layers):
    cache = PrefixCache(backbone, layers, 64, tmp_path)
    states, mask = cache.states(TEXTS).gather(torch.arange(len(TEXTS)))
    model = ConversionModel(backbone, ModelConfig.defaults(adapter_layers=layers, dim=8))
    encoder = model.item_encoder
    with torch.no_grad():
        # with fresh adapters (the identity), the encoder's output is the projection of the full backbone's mean
        ours = encoder(states, mask, torch.zeros(len(TEXTS), 2)) - encoder.numeric(torch.zeros(len(TEXTS), 2))
        expected = encoder.projection(full_model_embedding(backbone, TEXTS))
    # float16 storage of the cache is the only difference
    torch.testing.assert_close(ours, expected, atol=2e-2, rtol=2e-2)


def test_trained_adapters_match_running_the_whole_backbone_with_them(backbone, tmp_path):
    """The cache runs the first adapted layer's frozen BERT layer; the encoder then applies that layer's adapter
    and the later layers whole: the same as running every layer, with the adapters, from the embeddings."""
    from fedcvr.shared.model.encoder import extended_mask

    torch.manual_seed(0)
    model = ConversionModel(backbone, ModelConfig.defaults(adapter_layers=2, dim=8))
    encoder = model.item_encoder
    for layer in encoder.layers:  # trained adapters: not the identity any more
        torch.nn.init.normal_(layer.adapter.up.weight, std=0.2)
    states, mask = PrefixCache(backbone, 2, 64, tmp_path).states(TEXTS).gather(torch.arange(len(TEXTS)))
    tokens = backbone.tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        ours = encoder(states, mask, torch.zeros(len(TEXTS), 2))
        hidden = backbone.model.embeddings(input_ids=tokens["input_ids"], token_type_ids=tokens["token_type_ids"])
        attention = extended_mask(tokens["attention_mask"], hidden.dtype)
        frozen = list(backbone.model.encoder.layer)[: backbone.num_layers - 2]
        for layer in [*frozen, *encoder.layers]:
            hidden = layer(hidden, attention_mask=attention) if layer in frozen else layer(hidden, attention)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = encoder.projection(masked_mean(hidden, tokens["attention_mask"])) + \
            encoder.numeric(torch.zeros(len(TEXTS), 2))
    # float16 cache storage, and the thread count other tests set changes the rounding: up to 2.2e-3 seen; a
    # layer run twice (the bug this catches) is off by 1.5e-2
    torch.testing.assert_close(ours, expected, atol=4e-3, rtol=0)


def test_fresh_adapter_is_the_identity():
    adapter = BottleneckAdapter(16, 4)
    h = torch.randn(3, 5, 16)
    assert torch.equal(adapter(h), h)


def test_prefix_cache_reuses_disk_and_keeps_order(backbone, tmp_path, monkeypatch):
    cache = PrefixCache(backbone, 1, 64, tmp_path)
    first = cache.states(TEXTS[:3])
    assert len(list(cache.folder.glob("shard-*"))) == 1
    computed = []
    original = PrefixCache.compute
    monkeypatch.setattr(PrefixCache, "compute", lambda self, texts: computed.append(list(texts)) or
                        original(self, texts))
    again = PrefixCache(backbone, 1, 64, tmp_path).states([TEXTS[3], TEXTS[0], TEXTS[2]])
    assert computed == [[TEXTS[3]]], "only the new text is encoded"
    assert len(list(cache.folder.glob("shard-*"))) == 2
    width = int(first.lengths[0])
    assert torch.equal(again.states[1, :width], first.states[0, :width])
    assert again.states.dtype == torch.float16
    assert PrefixCache(backbone, 2, 64, tmp_path).folder != cache.folder


def test_prefix_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDCVR_CACHE", str(tmp_path / "c"))
    assert prefix_module.default_cache_root() == tmp_path / "c"


def test_only_trainable_weights_are_saved_and_the_backbone_never_is(backbone, tmp_path):
    model = ConversionModel(backbone, ModelConfig.defaults(adapter_layers=1, dim=8))
    state = trainable_state(model)
    assert state and all(p.requires_grad for p in model.trainable_parameters())
    assert not any("base_layer" in name or "backbone" in name for name in state)
    assert any(name.startswith("item_encoder.layers.0.adapter.") for name in state)
    assert {n.split(".")[0] for n in state} == {"item_encoder", "user_tower", "head"}
    frozen = sum(p.numel() for p in backbone.model.parameters())
    assert sum(v.numel() for v in state.values()) < frozen
    other = ConversionModel(backbone, ModelConfig.defaults(adapter_layers=1, dim=8))
    load_trainable_state(other, state)
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(other).values(), state.values()))
    with pytest.raises(ValueError, match="missing: item_encoder.layers.1.adapter"):
        load_trainable_state(ConversionModel(backbone, ModelConfig.defaults(adapter_layers=2, dim=8)), state)


def test_model_folder_round_trip_and_refusals(backbone, tiny_bert, tmp_path):
    model = ConversionModel(backbone, ModelConfig.defaults(encoder=str(tiny_bert), adapter_layers=1, dim=8))
    folder = save_model_folder(tmp_path / "m", model, backbone, {"train": {}})
    assert sorted(p.name for p in folder.iterdir()) == ["SHA256SUMS", "config.json", "encoder.json",
                                                        "weights.safetensors"]
    loaded, _, settings = load_model_folder(folder)
    assert settings["model"]["dim"] == 8
    assert all(torch.equal(a, b) for a, b in zip(trainable_state(loaded).values(), trainable_state(model).values()))
    other = load_backbone(str(make_tiny_bert(tmp_path / "other", seed=1)))
    with pytest.raises(ModelConfigError, match="trained with the encoder"):
        load_model_folder(folder, other)
    (folder / "weights.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="weights.safetensors missing"):
        load_model_folder(folder)


def test_towers_start_from_the_configured_rates(backbone):
    model = ConversionModel(backbone, ModelConfig.defaults(dim=8, attention_hidden=8, head_hidden=8, ctr_prior=0.05,
                                                  cvr_prior=0.25))
    assert torch.sigmoid(model.head.ctr[-1].bias).item() == pytest.approx(0.05)
    assert torch.sigmoid(model.head.cvr[-1].bias).item() == pytest.approx(0.25)


def test_esmm_scores_and_loss():
    ctr, cvr = torch.tensor([0.3, -2.0, 1.0]), torch.tensor([-1.0, 0.5, 2.0])
    clicked, purchased = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 1.0])
    p_ctr, p_ctcvr = torch.sigmoid(ctr), torch.sigmoid(ctr) * torch.sigmoid(cvr)
    expected = -(clicked * p_ctr.log() + (1 - clicked) * (1 - p_ctr).log()) \
        - (purchased * p_ctcvr.log() + (1 - purchased) * (1 - p_ctcvr).log())
    torch.testing.assert_close(esmm_loss(ctr, cvr, clicked, purchased, reduction="none"), expected)
    assert torch.all(p_ctcvr <= p_ctr)


def batch_inputs(batch: int, length: int, items: int) -> ScoreInputs:
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(batch, length, generator=generator) > 0.3
    mask[0] = False  # a shopper without history
    return ScoreInputs(
        target=torch.randint(0, items, (batch,), generator=generator),
        history=torch.randint(0, items, (batch, length), generator=generator),
        history_mask=mask, events=torch.randint(0, 4, (batch, length), generator=generator),
        age_hours=torch.rand(batch, length, generator=generator) * 500,
        position=torch.randint(0, 12, (batch,), generator=generator),
        signals=torch.rand(batch, N_SIGNALS, generator=generator))


def test_score_shapes_and_attention_over_real_history_only(backbone):
    model = ConversionModel(backbone, ModelConfig.defaults(adapter_layers=0, dim=8))
    items = torch.randn(20, 8)
    inputs = batch_inputs(6, 5, 20)
    ctr, cvr, weights = model.score(items, inputs)
    assert ctr.shape == cvr.shape == (6,) and weights.shape == (6, 5)
    assert torch.all(weights[~inputs.history_mask] == 0) and torch.all(weights[0] == 0)
    assert torch.isfinite(ctr).all() and torch.isfinite(cvr).all()


def test_scoring_candidates_equals_scoring_each_pair(backbone):
    """Full-catalog ranking scores n shoppers x k candidates at once; it must give what `score` gives for each
    (shopper, candidate) pair at an unknown position, including a shopper without history."""
    torch.manual_seed(1)
    config = ModelConfig.defaults(adapter_layers=0, dim=8, attention_hidden=6, head_hidden=5)
    model = ConversionModel(backbone, config).eval()
    items = torch.randn(30, 8)
    inputs = batch_inputs(4, 7, 30)
    candidates = torch.tensor([3, 0, 29, 11, 11, 17])
    n, k = 4, len(candidates)
    with torch.no_grad():
        signals = torch.rand(n, k, N_SIGNALS)
        signals[:, 4] = signals[:, 3]
        fast = model.score_candidates(items, inputs, candidates, signals)
        ctr, cvr, _ = model.score(items, inputs.paired_with(candidates, signals))
    assert fast.shape == (n, k)
    torch.testing.assert_close(fast, (torch.sigmoid(ctr) * torch.sigmoid(cvr)).view(n, k), rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[:, 3], fast[:, 4])  # the same candidate twice scores the same


def test_one_history_through_many_masks_equals_each_masked_history_scored_alone(backbone):
    """Serving's leave-one-out explanations read one history through N masks (`score_masked`, the attention
    computed once); each must score what `score_candidates` gives the history with that mask, and `score_against`
    (serving's scores and attention) what `score` gives each pair."""
    torch.manual_seed(2)
    config = ModelConfig.defaults(adapter_layers=0, dim=8, attention_hidden=6, head_hidden=5)
    model = ConversionModel(backbone, config).eval()
    items = torch.randn(30, 8)
    one = batch_inputs(1, 7, 30)
    one.history_mask = torch.ones(1, 7, dtype=torch.bool)
    masks = torch.rand(5, 7) > 0.4
    masks[0] = False  # every event left out: scored as no history
    candidates = torch.tensor([3, 0, 29, 11])
    with torch.no_grad():
        signals = torch.rand(5, 4, N_SIGNALS)
        fast = model.score_masked(items, one, masks, candidates, signals)
        repeated = ScoreInputs(**{name: getattr(one, name).repeat(5, *([1] * (getattr(one, name).dim() - 1)))
                                  for name in ("target", "history", "history_mask", "events", "age_hours",
                                               "position", "signals")})
        repeated.history_mask = masks
        slow = model.score_candidates(items, repeated, candidates, signals)
        ctr, cvr, attention = model.score_against(items, one, candidates, signals[:1])
        pair_ctr, pair_cvr, pair_attention = model.score(items, one.paired_with(candidates, signals[:1]))
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ctr[0], pair_ctr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cvr[0], pair_cvr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention[0], pair_attention, rtol=1e-5, atol=1e-6)


def test_user_tower_and_head_support_per_sample_gradients(backbone):
    """Opacus computes per-sample gradients of the tower and head: they equal one-sample-at-a-time autograd."""
    from opacus import GradSampleModule

    from fedcvr.shared.model.user_tower import recency_bucket
    from fedcvr.shared.training import dp_samplers  # noqa: F401  (registers the small tables' functions)

    model = ConversionModel(backbone, ModelConfig.defaults(adapter_layers=0, dim=8))

    class TowerAndHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.head = model.user_tower, model.head

        def forward(self, history, events, recency, mask, target, position, signals):
            user, _ = self.tower(history, events, recency, mask, target)
            ctr, cvr = self.head(user, target, position, signals)
            return ctr + cvr

    net = TowerAndHead()
    inputs = batch_inputs(4, 5, 20)
    items = torch.randn(20, 8)
    args = (items[inputs.history], inputs.events, recency_bucket(inputs.age_hours), inputs.history_mask,
            items[inputs.target], inputs.position, inputs.signals)
    wrapped = GradSampleModule(net, loss_reduction="sum")
    wrapped(*args).sum().backward()
    missing = [name for name, p in net.named_parameters() if p.grad_sample is None]
    assert not missing, missing
    per_sample = {name: p.grad_sample.clone() for name, p in net.named_parameters()}
    wrapped._close()  # remove the hooks before the one-sample reference passes
    for name, param in net.named_parameters():
        for i in range(4):
            one = tuple(a[i:i + 1] for a in args)
            grad = torch.autograd.grad(net(*one).sum(), param)[0]
            torch.testing.assert_close(per_sample[name][i], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kwargs, message", [
    ({"encoder": "/no/such/folder"}, "is not a Hugging Face model folder"),
    ({"adapter_layers": 3}, "adapter.layers = 3: the encoder .* has 2 transformer layers; use 0 to 2"),
])
def test_bad_encoder_settings_are_clear(tiny_bert, kwargs, message):
    with pytest.raises(ModelConfigError, match=message):
        config = ModelConfig.defaults(**{"encoder": str(tiny_bert), **kwargs})
        ConversionModel(load_backbone(config.encoder), config)


def test_non_bert_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelConfigError, match="'gpt2' model; fedcvr needs a BERT-family"):
        load_backbone(str(tmp_path))


@pytest.mark.parametrize("run_config, message", [
    ({"model.dim": 0}, "model.dim = 0: must be at least 1"),
    ({"adapter.layers": -1}, "adapter.layers = -1: must be at least 0"),
    ({"model.dim": "64"}, "model.dim = '64': expected a whole number"),
    ({"model.ctr-prior": 0}, "model.ctr-prior = 0.0: must be a rate strictly between 0 and 1"),
    ({"model.cvr-prior": 1.5}, "model.cvr-prior = 1.5: must be a rate strictly between 0 and 1"),
])
def test_model_config_errors_name_key_and_value(run_config, message):
    with pytest.raises(ModelConfigError, match=message):
        ModelConfig.from_run_config(run_config)


@pytest.mark.parametrize("run_config, message", [
    ({"train.device": "tpu"}, "train.device = 'tpu': use one of auto, cpu, cuda"),
    ({"train.lr": 0}, "train.lr = 0.0: must be > 0"),
])
def test_train_config_errors(run_config, message):
    with pytest.raises(ModelConfigError, match=message):
        TrainConfig.from_run_config(run_config)


def flat(table: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_prepare_refuses_zero_items_and_zero_examples():
    import pandas as pd

    from fedcvr.shared.data.loader import MerchantData
    from fedcvr.simulations.central import prepare

    empty = MerchantData("m", None, pd.DataFrame(columns=["item_id", "title", "description", "category", "brand",
                                                         "price"]),
                         pd.DataFrame({"user_id": [], "item_id": [], "event": [],
                                       "timestamp": pd.to_datetime([])}))
    with pytest.raises(ModelConfigError, match="zero items"):
        prepare([empty], ExampleConfig.defaults())


def test_a_damaged_local_blend_is_refused_by_name(tmp_path):
    memory = ItemMemory(["a", "b"], 4)
    with torch.no_grad():
        memory.blend.copy_(2 * torch.from_numpy(repeat_prior()))
    path = tmp_path / "local.safetensors"
    save_memory(memory, path)
    assert torch.equal(load_memory(path, 4).blend, memory.blend)
    for bad in (float("nan"), 1e9):
        with torch.no_grad():
            memory.blend[3] = bad
        save_memory(memory, path)
        with pytest.raises(ValueError, match="local.safetensors: the local blend holds .* but the model needs"):
            load_memory(path, 4)
    save_file({"table": torch.zeros(3, 4), "blend": torch.zeros(5)}, str(path), metadata={"item_ids": '["a", "b"]'})
    with pytest.raises(ValueError, match=r"the local blend holds \(5,\) weights"):
        load_memory(path, 4)
    save_file({"table": torch.zeros(3, 4)}, str(path), metadata={"item_ids": '["a", "b"]'})  # a file of before blends
    assert float(load_memory(path, 4).blend.abs().sum()) == 0.0


def test_every_section_of_the_run_config_fails_with_one_error_type():
    """Model, dp, examples, personalisation, baselines and the server's keys all raise SettingsError (each its
    own subclass), naming the key and the value."""
    from fedcvr.server.config import ConfigError, ServerConfig
    from fedcvr.shared.dp_config import DPConfig
    from fedcvr.shared.evaluation.baselines import BaselineConfig
    from fedcvr.shared.settings import SettingsError
    from fedcvr.shared.training.personalise import PersonaliseConfig

    bad = [(ModelConfig.from_run_config, {"model.dim": 0}, "model.dim"),
           (DPConfig.from_run_config, {"dp.target-epsilon": -1.0}, "dp.target-epsilon"),
           (ExampleConfig.from_run_config, {"examples.negatives": 0}, "examples.negatives"),
           (PersonaliseConfig.from_run_config, {"personalise-epochs": 0}, "personalise-epochs"),
           (ServerConfig.from_run_config, {"num-server-rounds": 0}, "num-server-rounds")]
    for read, run_config, key in bad:
        with pytest.raises(SettingsError, match=key):
            read(run_config)
    assert issubclass(ConfigError, SettingsError) and BaselineConfig.ERROR.__mro__[1] is SettingsError
