"""What every node spent is reported whole: resumed runs carry each node's privacy ledger, δ means something for
every node, and rounds and summaries state the worst (ε, δ) pair of any node."""

from __future__ import annotations

import json

import pytest
from flwr.app import RecordDict
from support import federation

from fedcvr.client.node import LEDGER_FILE, keep_ledger, ledger_path, load_ledger, resumed_ledger_path
from fedcvr.server.secagg import merge_node_metrics
from fedcvr.server.strategy import _train_metrics, run_privacy
from fedcvr.shared import run_records
from fedcvr.shared.data.loader import merchant_folders
from fedcvr.shared.dp_config import MAX_DEFAULT_DELTA, delta_for, delta_refusal
from fedcvr.shared.privacy import PrivacyLedger
from fedcvr.simulations.inprocess import run_federation

ROUNDS = 3


class Stopped(RuntimeError):
    """Stands for the run being killed (SIGINT or SIGKILL) once a round is done."""


def run(market, tiny_bert, out, *, stop_after=None, **overrides) -> list[dict]:
    """A 3-round DP run of the 3 merchants in this process; stopped once round `stop_after` is done (its
    checkpoint written), as a killed run is. Returns the rows of the rounds it reported."""
    _, run_config = federation(market, tiny_bert, out, **{"num-server-rounds": ROUNDS, **overrides})
    rows = []

    def on_round(row: dict) -> None:
        rows.append(row)
        if row["round"] == stop_after:
            raise Stopped(f"stopped after round {stop_after}")

    try:
        summary = run_federation(run_config, 3, on_round=on_round)
    except Stopped:
        return rows
    return summary["rounds"]


def ledgers(out) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((out / "models").glob(f"*/{LEDGER_FILE}"))}


def spent(rows: list[dict]) -> list[tuple[int, float, float]]:
    return [(row["round"], round(row["max-epsilon"], 9), row["delta"]) for row in rows]


@pytest.mark.slow  # whole runs: the integration lane (`make test-slow`)
def test_runs_resumed_into_new_folders_report_what_an_uninterrupted_run_spent(tiny_market, tiny_bert, tmp_path):
    whole = run(tiny_market, tiny_bert, tmp_path / "whole")
    assert [row["nodes-trained"] for row in whole] == [3, 3, 3]

    # stopped after round 1; resumed into a new folder and stopped after round 2; resumed from that into a third
    first = run(tiny_market, tiny_bert, tmp_path / "first", stop_after=1)
    second = run(tiny_market, tiny_bert, tmp_path / "second", stop_after=2, resume=str(tmp_path / "first"))
    third = run(tiny_market, tiny_bert, tmp_path / "third", resume=str(tmp_path / "second" / "checkpoint"))
    assert spent(first + second) == spent(whole[:2])  # ε per round: 1 and 2 rounds' spending
    assert spent(third) == spent(whole)  # the rounds of the checkpoint, then round 3: 3 rounds' spending
    summary = json.loads((tmp_path / "third" / "summary.json").read_text())
    assert spent(summary["rounds"]) == spent(whole)
    assert summary["privacy"] == run_privacy(whole)
    for merchant, ledger in ledgers(tmp_path / "whole").items():  # every node's ledger: all steps, all rounds
        resumed = ledgers(tmp_path / "third")[merchant]
        assert resumed["federation"] == summary["federation"]
        assert resumed["ledger"]["rounds-trained"] == ledger["ledger"]["rounds-trained"] == ROUNDS
        assert sum(resumed["ledger"]["steps"]) == sum(ledger["ledger"]["steps"])
        assert resumed["ledger"] == ledger["ledger"]


def test_an_interrupted_grid_run_starts_again_from_zero_with_a_fresh_federation(tiny_market, tiny_bert, tmp_path):
    """`fedcvr experiment` runs a run without result.json again from scratch in the same folder (no `resume`): its
    ledger files are of another federation, so the new run's ε is its own, neither carried nor lost."""
    stopped = run(tiny_market, tiny_bert, tmp_path / "run", stop_after=1)
    old = {m: ledger["federation"] for m, ledger in ledgers(tmp_path / "run").items()}
    again = run(tiny_market, tiny_bert, tmp_path / "run", stop_after=1)
    assert spent(again) == spent(stopped)  # one round's spending, not two
    assert all(ledger["federation"] != old[m] and ledger["ledger"]["rounds-trained"] == 1
               for m, ledger in ledgers(tmp_path / "run").items())


def test_a_deployed_node_goes_on_from_its_state_dir_ledger_when_the_coordinator_resumes(tmp_path):
    """`coordinator run --resume` keeps the federation id (server checkpoint) and the node keeps its ledger in its
    state-dir, which outlives runs: a fresh node process reads what it spent, whatever the coordinator's folders."""
    node_config = {"data-dir": str(tmp_path / "shop"), "model-dir": str(tmp_path / "model"),
                   "state-dir": str(tmp_path / "state")}
    run_config = {"out-dir": "/coordinator/runs/again", "resume": "/coordinator/runs/first"}
    path = ledger_path(node_config, run_config, tmp_path / "shop")
    assert path == tmp_path / "state" / LEDGER_FILE
    assert resumed_ledger_path(node_config, run_config, tmp_path / "shop") is None  # a coordinator path: not read
    before = PrivacyLedger(history=[(1.1, 0.25, 8)], noise_multiplier=1.1, delta=1e-5, rounds_trained=2)
    keep_ledger(before, RecordDict(), path, "federation-1")
    after = load_ledger(RecordDict(), path, "federation-1", None)  # the restarted node's empty state
    assert after == before and after.epsilon() > 0
    assert load_ledger(RecordDict(), path, "federation-2", None) == PrivacyLedger()  # another run's spending


def test_a_simulated_node_reads_the_ledger_of_the_run_it_resumes(tmp_path):
    shop = tmp_path / "data" / "shop-a"
    old, new = tmp_path / "old", tmp_path / "new"
    for resume in (old, old / "checkpoint"):
        found = resumed_ledger_path({"partition-id": 0}, {"out-dir": str(new), "resume": str(resume)}, shop)
        assert found == old / "models" / "shop-a" / LEDGER_FILE
    assert resumed_ledger_path({"partition-id": 0}, {"out-dir": str(new), "resume": ""}, shop) is None
    spent_before = PrivacyLedger(history=[(1.1, 0.25, 8)], noise_multiplier=1.1, delta=1e-5, rounds_trained=1)
    keep_ledger(spent_before, RecordDict(), found, "federation-1")
    assert load_ledger(RecordDict(), new / LEDGER_FILE, "federation-1", found) == spent_before
    assert load_ledger(RecordDict(), new / LEDGER_FILE, "federation-2", found) == PrivacyLedger()
    found.write_text("{not json")
    with pytest.raises(ValueError, match="privacy-ledger.json: the node's privacy ledger cannot be read"):
        load_ledger(RecordDict(), new / LEDGER_FILE, "federation-1", found)


def test_the_default_delta_is_small_for_every_node():
    for n in (1, 3, 30, 1_000, 9_999, 10_000, 20_000, 10**7):
        delta = delta_for(n)
        assert delta <= MAX_DEFAULT_DELTA == 1e-5 and n * delta <= 0.1 + 1e-12 and not delta_refusal(delta, n)
    assert delta_for(3) == 1e-5 and delta_for(20_000) == 1 / 200_000
    assert delta_refusal(1e-5, 99_999) == ""
    why = delta_refusal(1e-3, 1_000)
    assert "dp.target-delta = 0.001 is not below 1 / 1000" in why and "set dp.target-delta to at most 1.0e-05" in why


def test_a_node_declines_dp_at_a_delta_its_data_cannot_meet(tiny_market, tiny_bert, tmp_path):
    """dp.target-delta = 3e-4 is below 1 / n for merchants of 1,073 and 2,902 training examples, not for the
    merchant of 4,160: that one declines, saying why, and the round goes on with the others."""
    rows = run(tiny_market, tiny_bert, tmp_path / "run", stop_after=1, **{"dp.target-delta": 3e-4})
    assert rows[0]["nodes-trained"] == 2 and rows[0]["nodes-declined"] == 1 and rows[0]["nodes-failed"] == 0
    reason = rows[0]["declined"][0]
    assert "dp.target-delta = 0.0003 is not below 1 / 4160" in reason and "set dp.target-delta to at most" in reason
    assert rows[0]["delta"] == 3e-4 and 0 < rows[0]["max-epsilon"] <= 8.0
    assert sorted(ledgers(tmp_path / "run")) == [f.name for f in merchant_folders(tiny_market)]
    assert ledgers(tmp_path / "run")["merchant-01"]["ledger"]["steps"] == []  # it spent nothing


def test_rounds_and_summaries_state_the_worst_pair_of_any_node():
    """A large merchant at (3.0, 1e-6) and a small one at (2.0, 1e-5): what holds for both is (3.0, 1e-5)."""
    nodes = [{"num-examples": 300, "train-loss": 0.5, "epsilon": 3.0, "delta": 1e-6},
             {"num-examples": 100, "train-loss": 1.0, "epsilon": 2.0, "delta": 1e-5}]
    row = dict(_train_metrics([{"metrics": m} for m in nodes], "num-examples"))
    assert (row["max-epsilon"], row["delta"]) == (3.0, 1e-5)
    merged = merge_node_metrics(dict(enumerate(nodes)))  # one secure-aggregation reply for both
    assert (merged["epsilon"], merged["delta"]) == (3.0, 1e-5)
    rows = [{"round": 1, "max-epsilon": 3.0, "delta": 1e-6}, {"round": 2, "max-epsilon": 2.5, "delta": 1e-5}]
    assert run_privacy(rows) == {"max-epsilon": 3.0, "delta": 1e-5}  # a node that declined round 2 still counts
    assert run_privacy([{"round": 1}]) is None
    assert run_records.privacy_line(rows) == (
        "privacy: every node's training is (3.00, 1e-05)-DP or better for the whole run (the largest ε and the "
        "largest δ of any node)")
    assert "no privacy guarantee" in run_records.privacy_line([{"round": 1}])
    assert run_records.progress_text(rows[1]) == "ctcvr.auc n/a  max ε 2.50 (δ=1e-05)"
