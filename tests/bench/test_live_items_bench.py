"""bench/live_items.py --quick end to end: held-out items POSTed to a real `twotower serve` whose
export never had them. Every served rank is the offline rank (`evaluate`'s, with the held-out items
in the catalogue from the start); the warm users' served NDCG@10 before the items exist is the
offline one with them left out (shift b = -inf), and after, the offline one at b = 0."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "live_items.py"


@pytest.mark.slow
def test_items_added_live_rank_as_offline(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_live_items", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for text in ("| cold_valid |", "new items' share of top-10", "change ± paired SE", "warm change vs b = -inf", "POST /items of"):
        assert text in printed, text
    result = json.loads((tmp_path / "live_items.json").read_text())
    served = {row["split"]: row for row in result["served"]}
    assert set(served) == {"valid", "cold_valid", "cold"}
    for row in served.values():
        assert row["cases"] > 0 and row["agree"] == 1.0, row
        assert row["hr@10"] == row["hr@10_offline"] and row["ndcg@10"] == pytest.approx(row["ndcg@10_offline"], abs=1e-12)
    assert served["valid"]["new_share"] > 0 and served["cold_valid"]["hr@10"] > 0  # new items do get recommended
    shifted = {row["shift"]: row for row in result["trade_off"]}
    assert served["valid"]["ndcg@10_before"] == pytest.approx(shifted[float("-inf")]["valid"], abs=1e-12)
    assert served["valid"]["ndcg@10"] == pytest.approx(shifted[0.0]["valid"], abs=1e-12)
    assert served["cold_valid"]["ndcg@10"] == pytest.approx(shifted[0.0]["cold_valid"], abs=1e-12)
    assert shifted[float("-inf")]["cold_valid"] == 0.0
