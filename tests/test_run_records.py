"""The round records a run writes (`shared/run_records.py`): read while the run goes, the history, its CSV and
the rounds table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.console import Console

from fedcvr.shared import run_records

REPO = Path(__file__).resolve().parents[1]

ROUND_1 = {"round": 1, "seconds": 3.5, "ctcvr.auc": 0.61, "click.auc": 0.66, "ctcvr.gauc": 0.58,
           "ctcvr.logloss": 0.0512, "ndcg@10": 0.21, "max_epsilon": 1.9312, "delta": 1e-05,
           "bytes_sent": 2_500_000, "bytes_received": 1_250_000, "clients_trained": 3, "clients_declined": 0}
ROUND_2 = {**ROUND_1, "round": 2, "ctcvr.auc": 0.64, "max_epsilon": 2.71, "seconds": 3.1}


def test_read_rounds_leaves_a_half_written_last_line_for_the_next_poll(tmp_path):
    path = tmp_path / "rounds.jsonl"
    line2 = json.dumps(ROUND_2)
    path.write_text(json.dumps(ROUND_1) + "\n" + line2[:20])
    records, offset = run_records.read_rounds(path)
    assert records == [ROUND_1] and offset == len(json.dumps(ROUND_1)) + 1
    assert run_records.read_rounds(path, offset) == ([], offset)  # still half written
    with path.open("a") as handle:
        handle.write(line2[20:] + "\n")
    records, offset = run_records.read_rounds(path, offset)
    assert records == [ROUND_2] and offset == path.stat().st_size


def test_read_rounds_final_reads_a_last_line_without_newline_only_if_it_parses(tmp_path):
    path = tmp_path / "rounds.jsonl"
    path.write_text(json.dumps(ROUND_1) + "\n" + json.dumps(ROUND_2))
    assert run_records.read_rounds(path, final=True)[0] == [ROUND_1, ROUND_2]
    path.write_text(json.dumps(ROUND_1) + "\n" + json.dumps(ROUND_2)[:-5])
    assert run_records.read_rounds(path, final=True)[0] == [ROUND_1]


def test_read_rounds_skips_bad_lines_and_tolerates_a_missing_file(tmp_path):
    path = tmp_path / "rounds.jsonl"
    assert run_records.read_rounds(path, 7) == ([], 7)
    path.write_text("not json\n[1, 2]\n\n" + json.dumps(ROUND_1) + "\n")
    assert run_records.read_rounds(path)[0] == [ROUND_1]


def test_load_history_prefers_history_json_then_rounds_jsonl(tmp_path):
    assert run_records.load_history(tmp_path) == ([], None)
    (tmp_path / "rounds.jsonl").write_text(json.dumps(ROUND_2) + "\n" + json.dumps(ROUND_1) + "\n"
                                           + json.dumps({**ROUND_1, "ctcvr.auc": 0.7}) + "\n" + '{"round": 3')
    records, source = run_records.load_history(tmp_path)
    assert source == "rounds.jsonl"
    assert [r["round"] for r in records] == [1, 2] and records[0]["ctcvr.auc"] == 0.7  # the last of round 1
    (tmp_path / "history.json").write_text("[{\"round\": 1")  # unreadable: fall back
    assert run_records.load_history(tmp_path)[1] == "rounds.jsonl"
    (tmp_path / "history.json").write_text(json.dumps([ROUND_1, ROUND_2]))
    assert run_records.load_history(tmp_path) == ([ROUND_1, ROUND_2], "history.json")


def test_history_csv_has_one_row_per_round_with_round_first(tmp_path):
    records = [{"seconds": 1.0, "round": 1, "ctcvr.auc": None, "declined": ["x: no data"], "train": {"loss": 0.5}},
               {"round": 2, "seconds": 2.0, "ctcvr.auc": 0.6, "max-epsilon": 1.5}]
    path = run_records.write_history_csv(records, tmp_path / "history.csv")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["round", "seconds", "ctcvr.auc", "declined", "train.loss", "max-epsilon"]
    assert rows[0] == {"round": "1", "seconds": "1.0", "ctcvr.auc": "", "declined": '["x: no data"]',
                       "train.loss": "0.5", "max-epsilon": ""}
    assert rows[1]["ctcvr.auc"] == "0.6" and rows[1]["max-epsilon"] == "1.5"


def test_round_cells_format_metrics_epsilon_and_megabytes():
    assert run_records.round_cells(ROUND_1) == ["1", "0.6100", "0.6600", "0.5800", "0.0512", "0.2100", "1.93 (δ=1e-05)",
                                        "2.50 / 1.25", "3.5"]
    sparse = {"round": 4, "ctcvr.auc": float("nan"), "max-epsilon": float("inf"), "bytes_sent": 10**6}
    assert run_records.round_cells(sparse) == ["4", "n/a", "n/a", "n/a", "n/a", "n/a", "∞", "1.00 / n/a", "n/a"]
    assert run_records.round_cells({"round": 5, "max-epsilon": 2.0, "delta": 0.05})[6] == "2.00 (δ=0.05)"
    assert run_records.progress_text(None) == "waiting for round 1"
    assert run_records.progress_text(ROUND_2) == "ctcvr.auc 0.6400  max ε 2.71 (δ=1e-05)"


def test_rounds_table_renders_every_round():
    console = Console(record=True, width=200)
    console.print(run_records.rounds_table([ROUND_1, ROUND_2]))
    text = console.export_text()
    for column in run_records.TABLE_COLUMNS:
        assert column in text
    assert "0.6100" in text and "0.6400" in text and "2.71 (δ=1e-05)" in text


def test_tail_strips_colours_and_keeps_the_last_lines(tmp_path):
    log = tmp_path / "flower.log"
    log.write_text("".join(f"\x1b[92mINFO\x1b[0m: line {i}\n" for i in range(100)))
    text = run_records.tail(log, 40)
    assert text.splitlines() == [f"INFO: line {i}" for i in range(60, 100)]
    assert run_records.tail(tmp_path / "missing.log") == ""
