"""A merchant's recommendations: the two-stage recommender, `fedcvr recommend`, and the real HTTP server."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from support import a_shopper, make_model, start_serving
from typer.testing import CliRunner

from fedcvr.cli import app
from fedcvr.client.item_index import INDEX_DIR, INDEX_FILE
from fedcvr.client.recommender import Filters, History, Recommender, UnknownItems, open_recommender
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.integrity import write_digests
from fedcvr.shared.model.errors import ModelConfigError
from fedcvr.shared.model.folder import ENCODER


@pytest.fixture(scope="module")
def shop(tiny_market) -> Path:
    return tiny_market / "merchant-01"


@pytest.fixture
def model_dir(tmp_path, tiny_bert) -> Path:
    return make_model(tmp_path / "model", tiny_bert)


def test_recommend_ranks_by_pctcvr_explains_and_skips_bought_items(model_dir, shop):
    recommender = Recommender(model_dir, shop)
    shopper = a_shopper(shop, with_purchase=True)
    answer = recommender.recommend(shopper, k=5)
    items = answer["items"]
    assert len(items) == 5 and not answer["cold_start"] and answer["model_version"] == "v1"
    scores = [i["p_ctcvr"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert all(abs(i["p_ctcvr"] - i["p_ctr"] * i["p_cvr"]) < 1e-6 for i in items)
    history = recommender.history_of(shopper)
    bought = recommender.bought_by(shopper)
    assert bought and not {i["item_id"] for i in items} & bought
    for item in items:
        assert 1 <= len(item["because"]) <= 2
        assert all(b["item_id"] in history.item_ids and b["weight"] > 0 for b in item["because"])
        assert item["reason"].startswith("because you ") and item["because"][0]["title"] in item["reason"]


def test_two_stages_equal_the_full_catalog_ranking_when_every_item_is_a_candidate(model_dir, shop):
    """With every item a candidate, retrieval drops nothing: the top 10 are the catalog's top 10 by the model's own
    score of each item (`score`, which equals the evaluation's; test_same_scores.py), bought items left out."""
    recommender = Recommender(model_dir, shop, candidates=10**6)
    shopper = a_shopper(shop)
    two_stage = [i["item_id"] for i in recommender.recommend(shopper, k=10)["items"]]
    catalog = [str(i) for i in recommender.index.item_ids if str(i) not in recommender.bought_by(shopper)]
    scored = recommender.score(shopper, catalog)["items"]
    full = [s["item_id"] for s in sorted(scored, key=lambda s: -s["p_ctcvr"])[:10]]
    assert two_stage == full


def test_unknown_shoppers_get_the_flagged_popularity_ranking(model_dir, shop, tiny_market):
    recommender = Recommender(model_dir, shop)
    other = a_shopper(tiny_market / "merchant-02")  # another merchant's shopper is unknown here
    answer = recommender.recommend(other, k=5)
    assert answer["cold_start"] and answer["ranking"] == "popularity-by-conversion"
    rows = recommender.rows_of([i["item_id"] for i in answer["items"]])
    popularity = recommender.snapshot.popularity[rows]
    assert list(popularity) == sorted(popularity, reverse=True)
    assert popularity[0] == recommender.snapshot.popularity.max()
    own = set(load_merchant(shop).items["item_id"])
    assert {i["item_id"] for i in answer["items"]} <= own and all(not i["because"] for i in answer["items"])


def test_filters_and_ad_hoc_history(model_dir, shop):
    recommender = Recommender(model_dir, shop)
    items = load_merchant(shop).items
    category = str(items["category"].value_counts().index[0])
    history = History([str(items["item_id"].iloc[0])], ["purchase"], [1.0])
    answer = recommender.recommend(history=history, k=5, filters=Filters(category=category.upper(), max_price=50.0))
    chosen = items.set_index("item_id").loc[[i["item_id"] for i in answer["items"]]]
    assert len(chosen) and (chosen["category"] == category).all() and (chosen["price"] <= 50.0).all()
    assert str(items["item_id"].iloc[0]) not in chosen.index  # bought in the ad-hoc history
    with pytest.raises(UnknownItems) as unknown:
        recommender.recommend(history=History(["nope"], ["click"], [0.0]))
    assert unknown.value.ids == ["nope"]


def test_score_similar_and_unknown_items(model_dir, shop):
    recommender = Recommender(model_dir, shop)
    ids = [str(i) for i in recommender.index.item_ids[:3]]
    scored = recommender.score(a_shopper(shop), ids)
    assert [i["item_id"] for i in scored["items"]] == ids
    with pytest.raises(UnknownItems) as unknown:
        recommender.score(None, [ids[0], "missing-1", "missing-2"])
    assert unknown.value.ids == ["missing-1", "missing-2"]
    similar = recommender.similar(ids[0], k=4)
    assert len(similar["items"]) == 4 and ids[0] not in [i["item_id"] for i in similar["items"]]
    values = [i["similarity"] for i in similar["items"]]
    assert values == sorted(values, reverse=True) and all(-1.0001 <= v <= 1.0001 for v in values)


def test_new_items_are_recommendable_at_once_and_survive_a_restart(model_dir, shop):
    recommender = Recommender(model_dir, shop)
    size = len(recommender.index)
    first = str(recommender.index.item_ids[0])
    out = recommender.add_items([{"item_id": "new-1", "title": "Organic green tea, 100 g", "price": 4.5},
                                 {"item_id": first, "title": "Renamed item", "category": "tea"}])
    assert out == {"added": ["new-1"], "updated": [first], "catalog_size": size + 1}
    answer = recommender.recommend(history=History(["new-1"], ["cart"], [0.0]), k=3)
    assert answer["items"][0]["because"][0]["item_id"] == "new-1"
    assert recommender.similar("new-1", k=2)["title"] == "Organic green tea, 100 g"
    again = Recommender(model_dir, shop)
    assert not again.index_built and len(again.index) == size + 1
    np.testing.assert_allclose(again.index.embeddings, recommender.index.embeddings, atol=1e-6)
    assert again.titles[again.index.position[first]] == "Renamed item"


def test_the_index_is_rebuilt_for_a_new_model_version(model_dir, shop, tiny_bert):
    first = Recommender(model_dir, shop)
    assert first.index_built and (model_dir / INDEX_DIR / INDEX_FILE).is_file()
    assert not Recommender(model_dir, shop).index_built
    make_model(model_dir, tiny_bert, seed=1, version="v2")
    second = Recommender(model_dir, shop)
    assert second.index_built and second.version == "v2"
    assert not np.allclose(first.index.embeddings, second.index.embeddings)


def test_bad_model_folders_are_refused_with_the_reason(model_dir, shop, tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        open_recommender(tmp_path / "nothing", shop)
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "weights.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="weights.safetensors missing"):
        open_recommender(broken, shop)
    other = tmp_path / "other-encoder"
    shutil.copytree(model_dir, other)
    reference = json.loads((other / ENCODER).read_text())
    (other / ENCODER).write_text(json.dumps({**reference, "key": "0123456789abcdef"}))
    with pytest.raises(ModelConfigError, match="encoder.json does not match its SHA-256 digest"):
        open_recommender(other, shop)
    write_digests(other, ("weights.safetensors", "config.json", ENCODER))  # as if written with that encoder
    with pytest.raises(ModelConfigError, match="trained with the encoder"):
        open_recommender(other, shop)


def test_cli_recommend_prints_the_table_and_refuses_bad_folders(model_dir, shop, tmp_path):
    shopper = a_shopper(shop)
    result = CliRunner().invoke(app, ["recommend", "--model-dir", str(model_dir), "--data-dir", str(shop),
                                      "--user", shopper, "-k", "3"])
    assert result.exit_code == 0, result.output
    assert "pCTCVR" in result.output and "because you" in result.output
    cold = CliRunner().invoke(app, ["recommend", "--model-dir", str(model_dir), "--data-dir", str(shop),
                                    "--user", "nobody", "-k", "3"])
    assert cold.exit_code == 0 and "cold-start" in cold.output
    bad = CliRunner().invoke(app, ["recommend", "--model-dir", str(tmp_path / "x"), "--data-dir", str(shop),
                                   "--user", shopper])
    assert bad.exit_code == 2 and "does not exist" in bad.output


# ---------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def served(shop, tiny_bert, tmp_path_factory):
    """`fedcvr serve` on 127.0.0.1 and a free port, stopped by its PID; one server for this module's HTTP tests
    (starting one takes seconds), which run in order: the bad-input tests also check that it goes on after them.
    -> (client, the token file the server made in its model folder)."""
    tmp_path = tmp_path_factory.mktemp("serve")
    model_dir = make_model(tmp_path / "model", tiny_bert)
    process, base = start_serving(model_dir, shop, tmp_path / "serve.log")
    try:
        yield httpx.Client(base_url=base, timeout=30), model_dir / "serve.token"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(served) -> httpx.Client:
    return served[0]


@pytest.fixture(scope="module")
def write(served) -> dict[str, str]:
    """The header POST /items needs, with the token `fedcvr serve` made at its first start."""
    return {"authorization": f"Bearer {served[1].read_text().strip()}"}


def test_the_server_makes_a_private_token_and_refuses_writes_without_it(served, write):
    client, token_file = served
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    item = {"items": [{"item_id": "no-token", "title": "Tea"}]}
    assert client.post("/items", json=item).status_code == 401
    assert client.post("/items", json=item, headers={"authorization": "Bearer guess"}).status_code == 401
    assert client.get("/similar/no-token").status_code == 404  # nothing was added


def test_every_endpoint_of_the_running_server(server, write, shop, tiny_market):
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model_version"] == "v1" and health["merchant"] == "merchant-01"
    size = health["catalog_size"]
    shopper = a_shopper(shop)
    ranked = server.post("/recommend", json={"user_id": shopper, "k": 4}).json()
    assert len(ranked["items"]) == 4 and not ranked["cold_start"]
    assert set(ranked["items"][0]) >= {"item_id", "title", "p_ctcvr", "p_ctr", "p_cvr", "because"}
    first = ranked["items"][0]["item_id"]
    ad_hoc = server.post("/recommend", json={"history": [{"item_id": first, "event": "click"}], "k": 3,
                                             "max_price": 1000, "exclude_bought": False}).json()
    assert len(ad_hoc["items"]) == 3 and ad_hoc["items"][0]["because"][0]["item_id"] == first
    cold = server.post("/recommend", json={"user_id": a_shopper(tiny_market / "merchant-02"), "k": 3}).json()
    assert cold["cold_start"] and cold["ranking"] == "popularity-by-conversion"
    scored = server.post("/score", json={"user_id": shopper, "item_ids": [first]}).json()
    assert scored["items"][0]["item_id"] == first
    similar = server.get(f"/similar/{first}", params={"k": 3}).json()
    assert len(similar["items"]) == 3
    added = server.post("/items", json={"items": [{"item_id": "new-1", "title": "Organic green tea, 100 g",
                                                   "price": 4.5}]}, headers=write).json()
    assert added["added"] == ["new-1"] and added["catalog_size"] == size + 1
    now = server.post("/recommend", json={"history": [{"item_id": "new-1", "event": "purchase"}], "k": 2,
                                          "exclude_bought": False}).json()
    assert now["items"][0]["because"][0]["title"] == "Organic green tea, 100 g"
    assert server.get("/health").json()["catalog_size"] == size + 1
    assert server.get("/openapi.json").json()["paths"].keys() >= {"/recommend", "/score", "/similar/{item_id}",
                                                                 "/items", "/health"}


@pytest.mark.parametrize("method, path, body, status, needle", [
    ("post", "/score", {"item_ids": ["ghost-1", "ghost-2"]}, 404, "ghost-1"),
    ("get", "/similar/ghost-3", None, 404, "ghost-3"),
    ("post", "/recommend", {"history": [{"item_id": "ghost-4", "event": "click"}]}, 404, "ghost-4"),
    ("post", "/recommend", {"k": 0}, 422, "k"),
    ("post", "/recommend", {"k": "ten"}, 422, "k"),
    ("post", "/recommend", {"history": [{"item_id": "x", "event": "like"}]}, 422, "event"),
    ("post", "/recommend", {"min_price": 10, "max_price": 1}, 422, "min_price"),
    ("post", "/recommend", {"user": "typo"}, 422, "user"),
    ("post", "/score", {"user_id": "u"}, 422, "item_ids"),
    ("post", "/items", {"items": [{"item_id": "n", "title": "  "}]}, 422, "title"),
    ("post", "/items", {"items": [{"item_id": "n", "title": "t", "price": -1}]}, 422, "price"),
    ("post", "/items", {"items": []}, 422, "items"),
    ("get", "/similar/x?k=0", None, 422, "k"),
])
def test_bad_input_names_the_problem_and_the_server_goes_on(server, write, method, path, body, status, needle):
    response = server.post(path, json=body, headers=write) if method == "post" else server.get(path)
    assert response.status_code == status, response.text
    assert needle in response.text
    assert server.get("/health").status_code == 200


def test_a_body_that_is_not_json_is_refused(server):
    broken = server.post("/recommend", content=b'{"k": 3,', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and "JSON" in broken.text
    undecodable = server.post("/recommend", content=b"\xff\xfe", headers={"content-type": "application/json"})
    assert undecodable.status_code in (400, 422) and "detail" in undecodable.json()
    assert server.get("/health").status_code == 200


def test_cli_serve_refuses_to_start_without_a_usable_model(model_dir, shop, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").unlink()
    result = CliRunner().invoke(app, ["serve", "--model-dir", str(broken), "--data-dir", str(shop), "--port", "1"])
    assert result.exit_code == 2 and "config.json missing" in result.output
    result = CliRunner().invoke(app, ["serve", "--model-dir", str(model_dir), "--data-dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "failed validation" in " ".join(result.output.split())  # long paths wrap
