"""`fedcvr serve --workers N`: worker processes forked from one loaded recommender share its state, see each
other's added items, take turns writing, are restarted when one dies and stop together."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from support import descendants, make_model, start_serving

from fedcvr.client.recommender import Recommender

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="worker processes are forked (POSIX)")


@pytest.fixture
def model_dir(tmp_path, tiny_bert) -> Path:
    return make_model(tmp_path / "model", tiny_bert)


def test_a_worker_sees_the_items_another_added_and_writes_build_on_each_other(model_dir, tiny_market):
    shop = tiny_market / "merchant-01"
    first, second = Recommender(model_dir, shop), Recommender(model_dir, shop)  # two workers of one folder
    size = len(first.index)
    first.add_items([{"item_id": "from-first", "title": "Green tea, 100 g", "price": 4.5}])
    assert second.similar("from-first", k=1)["title"] == "Green tea, 100 g"  # re-read at its next request
    second.add_items([{"item_id": "from-second", "title": "Black tea, 250 g"}])  # starts from first's write
    assert len(second.index) == size + 2
    assert first.similar("from-second", k=1)["title"] == "Black tea, 250 g"
    fresh = Recommender(model_dir, shop)  # a restart keeps both
    assert {"from-first", "from-second"} <= set(fresh.index.position) and len(fresh.index) == size + 2


def _workers(pid: int) -> set[int]:
    return {p for p in descendants(pid) if Path(f"/proc/{p}/stat").exists()}


def test_served_by_two_workers_restarted_when_one_dies_and_stopped_together(tmp_path, tiny_bert, tiny_market):
    shop = tiny_market / "merchant-01"
    model_dir = make_model(tmp_path / "model", tiny_bert)
    log = tmp_path / "serve.log"
    process, base = start_serving(model_dir, shop, log, "--workers", "2")
    try:
        workers = _workers(process.pid)
        assert len(workers) == 2, log.read_text()
        token = (model_dir / "serve.token").read_text().strip()
        added = httpx.post(f"{base}/items", json={"items": [{"item_id": "shared", "title": "Oolong tea"}]},
                           headers={"authorization": f"Bearer {token}"}, timeout=30)
        assert added.status_code == 200
        for _ in range(12):  # a new connection each time: the kernel spreads them over both workers
            assert httpx.get(f"{base}/similar/shared", params={"k": 2}, timeout=30).status_code == 200
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (len(_workers(process.pid)) < 2 or victim in _workers(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_workers(process.pid)) == 2 and victim not in _workers(process.pid), log.read_text()
        assert "starting another" in log.read_text()
        for _ in range(6):
            answer = httpx.get(f"{base}/similar/shared", params={"k": 2}, timeout=30)
            assert answer.status_code == 200 and answer.json()["title"] == "Oolong tea"
        workers = _workers(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    assert code == 0, log.read_text()
    assert not any(Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                   for p in workers)  # every worker ended with the parent


def test_bad_worker_counts_are_refused(model_dir, tiny_market):
    from typer.testing import CliRunner

    from fedcvr.cli import app

    result = CliRunner().invoke(app, ["serve", "--model-dir", str(model_dir), "--data-dir",
                                      str(tiny_market / "merchant-01"), "--workers", "0"])
    assert result.exit_code != 0 and "--workers must be between 1 and 64" in result.output
