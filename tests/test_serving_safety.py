"""The recommendation service against hostile or unlucky use: writes racing reads, writes without the token,
oversized or non-JSON-safe bodies (a hypothesis fuzz over every endpoint), raw shopper ids, explanations that
come from each item's own scoring, and tables sorted by the score they show."""

from __future__ import annotations

import json
import shutil
import stat
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import a_shopper, make_model
from typer.testing import CliRunner

from fedcvr.cli import app as cli
from fedcvr.client.api import create_app
from fedcvr.client.api_guard import load_or_create_token
from fedcvr.client.item_index import INDEX_DIR, ItemIndex
from fedcvr.client.recommender import Filters, History, Recommender
from fedcvr.client.scoring import score_rows
from fedcvr.shared.data.loader import load_merchant
from fedcvr.shared.data.pseudonym import KEY_FILE, merchant_key, pseudonym, pseudonymise_folder

TOKEN = "test-token-0123456789"


@pytest.fixture(scope="module")
def shop(tiny_market) -> Path:
    return tiny_market / "merchant-01"


@pytest.fixture(scope="module")
def recommender(shop, tiny_bert, tmp_path_factory) -> Recommender:
    return Recommender(make_model(tmp_path_factory.mktemp("safety") / "model", tiny_bert), shop)


@pytest.fixture(scope="module")
def client(recommender) -> TestClient:
    return TestClient(create_app(recommender, token=TOKEN), raise_server_exceptions=False)


WRITE = {"authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------- item 5: writes racing reads


def test_adding_items_while_answering_never_breaks_a_reader(recommender, shop):
    """One writer adds items in a loop while readers recommend (with filters, cold and warm), score and look up
    similar items: before the catalog was one snapshot, a reader saw the new index with the old per-item arrays
    (`operands could not be broadcast together`)."""
    shopper = a_shopper(shop)
    category = str(load_merchant(shop).items["category"].iloc[0])
    first = str(recommender.index.item_ids[0])
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                recommender.recommend(shopper, k=5, filters=Filters(category=category, max_price=1e6))
                recommender.recommend("nobody", k=5, filters=Filters(min_price=0.0))
                recommender.score(shopper, [first])
                recommender.similar(first, k=3)
            except BaseException as err:  # noqa: BLE001 - any error of a reader fails the test
                errors.append(err)
                stop.set()

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as finely as possible
    readers = [threading.Thread(target=read) for _ in range(4)]
    try:
        for thread in readers:
            thread.start()
        for n in range(25):
            if stop.is_set():
                break
            recommender.add_items([{"item_id": f"race-{n}", "title": f"Race item {n}", "category": category,
                                    "price": 1.0 + n}])
    finally:
        stop.set()
        for thread in readers:
            thread.join()
        sys.setswitchinterval(switch)
    assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
    snapshot = recommender.snapshot
    assert len(snapshot.titles) == len(snapshot.index) == len(snapshot.popularity) == len(snapshot.prices)


# ---------------------------------------------------------------- item 6: writes need the token, limits


def test_writes_need_the_token_and_reads_stay_open(client):
    item = {"items": [{"item_id": "tok-1", "title": "Tea"}]}
    missing = client.post("/items", json=item)
    assert missing.status_code == 401 and "token" in missing.json()["detail"]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert client.post("/items", json=item, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/items", json=item, headers={"authorization": TOKEN}).status_code == 401  # no scheme
    assert client.post("/items", json=item, headers=WRITE).json()["added"] == ["tok-1"]
    assert client.post("/recommend", json={"user_id": "x", "k": 2}).status_code == 200
    assert client.get("/similar/tok-1").status_code == 200


def test_reads_need_the_token_too_when_closed(recommender):
    closed = TestClient(create_app(recommender, token=TOKEN, open_reads=False))
    assert closed.post("/recommend", json={"k": 2}).status_code == 401
    assert closed.post("/recommend", json={"k": 2}, headers=WRITE).status_code == 200
    assert closed.get("/health").status_code == 200  # liveness stays open, it tells nothing about shoppers


def test_oversized_bodies_and_items_are_refused_with_the_limit(client):
    huge = json.dumps({"items": [{"item_id": "big", "title": "x" * 2_000_000}]})
    too_big = client.post("/items", content=huge, headers={**WRITE, "content-type": "application/json"})
    assert too_big.status_code == 413 and "1048576" in too_big.json()["detail"]

    def chunks():  # no content-length: the bytes are counted as they arrive
        for _ in range(40):
            yield b" " * 65_536
        yield b"{}"

    streamed = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
    many = {"items": [{"item_id": f"m{i}", "title": "t"} for i in range(101)]}
    assert client.post("/items", json=many, headers=WRITE).status_code == 422
    long_title = client.post("/items", json={"items": [{"item_id": "l", "title": "x" * 1001}]}, headers=WRITE)
    assert long_title.status_code == 422 and "title" in long_title.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("field, value", [
    ("title", "<script>alert(1)</script>"), ("title", "Tea <b>bold</b>"), ("title", "Tea\x00"),
    ("title", "Tea\u202eevil"), ("brand", "<img src=x>"), ("description", "line\x07bell"),
    ("category", "a\nb"),
])
def test_markup_and_control_characters_are_refused(client, recommender, field, value):
    item = {"item_id": "markup", "title": "Plain tea", field: value}
    response = client.post("/items", json={"items": [item]}, headers=WRITE)
    assert response.status_code == 422 and field in response.text, response.text
    assert "markup" not in recommender.snapshot.index.position


def test_plain_text_with_symbols_and_newlines_in_descriptions_is_accepted(client, recommender):
    item = {"item_id": "plain", "title": "Tea & biscuits: 2 > 1, 5 < 6 (100 g)", "description": "Line one\nLine two"}
    assert client.post("/items", json={"items": [item]}, headers=WRITE).status_code == 200
    snapshot = recommender.snapshot
    assert snapshot.titles[snapshot.index.position["plain"]] == item["title"]


def test_the_token_file_is_made_once_private_and_refused_when_others_can_read_it(tmp_path):
    path = tmp_path / "serve.token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_or_create_token(path)


# ---------------------------------------------------------------- item 7: hostile JSON answers 4xx


@pytest.mark.parametrize("path, raw, needle", [
    ("/recommend", b'{"k": NaN}', "NaN"),
    ("/recommend", b'{"min_price": Infinity}', "Infinity"),
    ("/recommend", b'{"max_price": -Infinity}', "Infinity"),
    ("/recommend", b'{"max_price": 1e400}', "1e400"),
    ("/recommend", b'{"k": 1e400}', "1e400"),
    ("/recommend", b'{"history": [{"item_id": "a", "event": "click", "age_hours": NaN}]}', "NaN"),
    ("/recommend", b'{"user_id": "\\ud800"}', "surrogate"),
    ("/recommend", b'{"\\udfff": 1}', "surrogate"),
    ("/score", b'{"item_ids": ["\\ud83d"]}', "surrogate"),
    ("/score", b'{"item_ids": NaN}', "NaN"),
    ("/items", b'{"items": [{"item_id": "n", "title": "t", "price": NaN}]}', "NaN"),
    ("/items", b'{"items": [{"item_id": "n", "title": "\\udc00"}]}', "surrogate"),
    ("/recommend", b'{"k": ' + b"9" * 5000 + b"}", "digits"),
    ("/recommend", b"NaN", "NaN"),
])
def test_non_finite_numbers_and_lone_surrogates_answer_422_with_a_readable_message(client, path, raw, needle):
    response = client.post(path, content=raw, headers={**WRITE, "content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert needle in response.json()["detail"][0]["msg"]
    assert client.get("/health").status_code == 200


def test_a_validation_error_never_echoes_an_unserialisable_value(recommender):
    """Past the strict parser (a body built in process), pydantic's error holds the value itself: the 422 handler
    writes it safely instead of failing while serialising it."""
    from fastapi.exceptions import RequestValidationError

    from fedcvr.client.api_guard import safe_errors

    error = RequestValidationError([{"type": "x", "loc": ("body", "k", "\ud800"), "msg": "bad \udc00",
                                     "input": [float("nan"), float("inf"), "\ud800", b"\xff", object()]}])
    text = json.dumps(safe_errors(error.errors()), allow_nan=False).encode()
    assert b"nan" in text and b"\\\\ud800" in text


JSON_LEAF = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
             | st.sampled_from(["\ud800", "\udfff", "<b>x</b>", "\x00", "", " ", "click", "purchase", "a" * 600]))
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = {
    "/recommend": ["user_id", "history", "k", "category", "min_price", "max_price", "exclude_bought"],
    "/score": ["user_id", "item_ids"],
    "/items": ["items"],
}
HISTORY = st.lists(st.fixed_dictionaries({"item_id": JSON_VALUE, "event": JSON_VALUE},
                                         optional={"age_hours": JSON_VALUE}), max_size=3)
ITEMS = st.lists(st.fixed_dictionaries({"item_id": JSON_VALUE, "title": JSON_VALUE},
                                       optional={"price": JSON_VALUE, "description": JSON_VALUE,
                                                 "category": JSON_VALUE, "brand": JSON_VALUE}), max_size=3)


@st.composite
def hostile_requests(draw):
    """(method, path, raw body or None): bodies near the real schema with hostile values, arbitrary JSON, or raw
    bytes with non-finite numbers and escapes Python's parser accepts."""
    path = draw(st.sampled_from(["/recommend", "/score", "/items", "/similar", "/health"]))
    if path == "/similar":  # percent-encoded as raw bytes, so that lone surrogates and controls reach the server
        item = quote(draw(st.text(min_size=1, max_size=10) | JSON_LEAF.map(str)), safe="", errors="surrogatepass")
        k = quote(str(draw(JSON_LEAF)), safe="", errors="surrogatepass")
        return "get", f"/similar/{item}?k={k}", None
    if path == "/health":
        return "get", path, None
    kind = draw(st.sampled_from(["schema", "any", "raw"]))
    if kind == "any":
        body = draw(JSON_VALUE)
    elif kind == "raw":
        body = None
        raw = draw(st.sampled_from([b"NaN", b"[Infinity]", b'{"k": -Infinity}', b'{"k": 1e999}', b"\xff\xfe",
                                    b'{"user_id": "\\ud800\\u0000"}', b"{" * 50, b"[" * 5000, b'{"k": 3,',
                                    b'"\\udfff"', b'{"items": [{"item_id": "\\ud800", "title": 1e400}]}']))
        return "post", path, raw
    else:
        keys = draw(st.lists(st.sampled_from(FIELDS[path]), unique=True, max_size=len(FIELDS[path])))
        body = {}
        for key in keys:
            body[key] = draw(HISTORY if key == "history" else ITEMS if key == "items" else JSON_VALUE)
    return "post", path, json.dumps(body, allow_nan=True).encode()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(request=hostile_requests())
def test_fuzz_no_hostile_request_gets_a_5xx(client, request):
    method, path, payload = request
    if method == "get":
        response = client.get(path)
    else:
        response = client.post(path, content=payload, headers={**WRITE, "content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["detail"]


# ---------------------------------------------------------------- item 8: raw ids, explanations, sorted tables


@pytest.fixture(scope="module")
def imported_shop(shop, tmp_path_factory) -> tuple[Path, str]:
    """merchant-01's folder as an import leaves it: shopper ids pseudonymised under its own pseudonym.key.
    -> (folder, a raw id with history)."""
    folder = tmp_path_factory.mktemp("imported") / "merchant-01"
    shutil.copytree(shop, folder)
    raw = a_shopper(folder)
    pseudonymise_folder(folder)
    return folder, raw


def test_cli_recommend_accepts_a_raw_id_where_the_folder_has_its_key(imported_shop, recommender):
    folder, raw = imported_shop
    model = str(recommender.model_dir)
    result = CliRunner().invoke(cli, ["recommend", "--model-dir", model, "--data-dir", str(folder), "--user", raw,
                                      "-k", "3"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    hashed = pseudonym(raw, merchant_key(folder))
    assert f"raw id {raw}" in text and hashed in text and "pseudonym.key" in text
    assert "cold-start" not in text and "because you" in text
    direct = CliRunner().invoke(cli, ["recommend", "--model-dir", model, "--data-dir", str(folder), "--user",
                                      hashed, "-k", "3"])
    assert direct.exit_code == 0 and "as given" in " ".join(direct.output.split())


def test_cli_recommend_says_clearly_when_an_id_matches_nothing(imported_shop, recommender, shop):
    folder, _ = imported_shop
    for data in (folder, shop):
        result = CliRunner().invoke(cli, ["recommend", "--model-dir", str(recommender.model_dir), "--data-dir",
                                          str(data), "--user", "no-such-shopper", "-k", "3"])
        text = " ".join(result.output.split())
        assert result.exit_code == 0 and "no shopper no-such-shopper" in text and "cold-start" in text
        if (data / KEY_FILE).is_file():
            assert "as given and as a raw id (its pseudonym" in text
        else:
            assert f"has no {KEY_FILE}" in text


@pytest.fixture(scope="module")
def saturated(shop, tiny_bert, tmp_path_factory) -> Recommender:
    """A recommender in the state a trained model was seen in: the user tower's attention saturated (every
    history event gets weight 1.0 for every candidate), with items that the model can tell apart (distinct
    embeddings in the item index)."""
    model_dir = make_model(tmp_path_factory.mktemp("saturated") / "model", tiny_bert)
    index = Recommender(model_dir, shop).index
    spread = np.random.default_rng(0).normal(size=index.embeddings.shape).astype(np.float32)
    ItemIndex(index.item_ids, 3.0 * spread, index.version, index.digest).save(model_dir / INDEX_DIR)
    recommender = Recommender(model_dir, shop)
    assert not recommender.index_built  # serves the index written above
    with torch.no_grad():
        recommender.model.user_tower.attention[2].bias += 50.0
    return recommender


def test_each_explanation_comes_from_that_items_own_scoring(saturated, shop):
    """An item's "because" names the history items whose removal lowers that item's pCTCVR the most (checked by
    scoring the item again without each of them). Ranking by raw attention weights named the same history items
    for all 10 items once the weights saturate (all 1.0, ties broken by position)."""
    shopper = a_shopper(shop)
    history = saturated.history_of(shopper)
    every_item = np.arange(len(saturated.index))
    signals = saturated.signals(shopper, history, every_item, saturated.snapshot, stored=True)
    assert np.all(score_rows(saturated.model, saturated.index, every_item, history, signals).attention == 1.0)
    # the history given ad hoc, as the checks below score it (a stored shopper's signals read their whole history)
    answer = saturated.recommend(None, history=history, k=10, filters=Filters(exclude_bought=False))
    distinct = list(dict.fromkeys(history.item_ids))
    lines = set()
    for item in answer["items"]:
        full = saturated.score(None, [item["item_id"]], history)["items"][0]["p_ctcvr"]
        drops = {}
        for left_out in distinct:
            keep = [i for i, h in enumerate(history.item_ids) if h != left_out]
            rest = History([history.item_ids[i] for i in keep], [history.events[i] for i in keep],
                           [history.age_hours[i] for i in keep])
            drops[left_out] = full - saturated.score(None, [item["item_id"]], rest)["items"][0]["p_ctcvr"]
        ranked = sorted(drops, key=lambda i: -drops[i])
        expected = [i for i in ranked[:2] if drops[i] > 0] or ranked[:1]
        assert [b["item_id"] for b in item["because"]] == expected
        for because in item["because"]:
            assert because["contribution"] == pytest.approx(drops[because["item_id"]], rel=1e-3, abs=1e-7)
        lines.add(item["reason"])
    assert len(lines) > 1, lines


def test_cold_start_items_are_sorted_by_the_score_they_show(recommender, client):
    answer = recommender.recommend("nobody", k=8)
    assert answer["cold_start"] and answer["ranking"] == "popularity-by-conversion"
    shown = [item["popularity"] for item in answer["items"]]
    assert shown == sorted(shown, reverse=True) and len(shown) == 8
    assert client.post("/recommend", json={"user_id": "nobody", "k": 3}).json()["items"][0]["popularity"] == shown[0]


def _table_rows(output: str) -> list[list[str]]:
    """The cells of a printed table's rows (a row's wrapped continuation lines, with an empty first cell, left out)."""
    rows = [[cell.strip() for cell in line.replace("┃", "│").split("│")[1:-1]] for line in output.splitlines()
            if line.startswith(("│", "┃")) and line.count(line[0]) > 2]
    return [row for row in rows if row[0]]


def test_every_cli_table_is_sorted_by_the_score_it_shows(recommender, shop):
    model = str(recommender.model_dir)
    for user, column in ((a_shopper(shop), "pCTCVR"), ("nobody", "popularity")):
        result = CliRunner().invoke(cli, ["recommend", "--model-dir", model, "--data-dir", str(shop), "--user",
                                          user, "-k", "6"])
        assert result.exit_code == 0, result.output
        rows = _table_rows(result.output)
        header, body = rows[0], rows[1:]
        assert column in header and len(body) == 6, result.output
        scores = [float(row[header.index(column)]) for row in body]
        assert scores == sorted(scores, reverse=True)
        if column == "popularity":
            assert "pCTCVR" not in header  # the model's scores do not order this table, so they are not shown
    assert np.all(np.diff([i["popularity"] for i in recommender.recommend("nobody", k=6)["items"]]) <= 0)
