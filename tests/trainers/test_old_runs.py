"""What users already have keeps working after the move to one import root: a run folder (its
checkpoint and config.yaml) and an export written by twotower 0.1.0 (`python -m trainers`), stored
in tests/data/v0.1.0 with the numbers that version printed (see its README.md)."""
import json
import shutil
from pathlib import Path

import pytest

from twotower.configs import load_config
from twotower.serving.export_format import load_exported
from twotower.serving.recommender import Recommender

from helpers import twotower

OLD = Path(__file__).resolve().parents[1] / "data" / "v0.1.0"
HISTORY = ["i00001", "i00002", "i00003"]


def test_an_old_export_loads_and_recommends_what_it_did():
    expected = json.loads((OLD / "recommend_i00001-i00003.json").read_text())
    exported = load_exported(OLD / "export")
    [row] = Recommender(exported).recommend([HISTORY], 5)
    assert [i for i, _ in row] == [r["item_id"] for r in expected["items"]]
    assert [s for _, s in row] == pytest.approx([r["score"] for r in expected["items"]], abs=1e-6)


def test_an_old_checkpoint_evaluates_and_exports_as_it_did(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD / "run", run)
    data = f"data.dir={tmp_path / 'data'}"  # the synthetic data, generated again from the stored config
    prepare = twotower("prepare", "-c", str(run / "config.yaml"), data, cwd=tmp_path)
    assert prepare.returncode == 0, prepare.stderr[-3000:]
    evaluate = twotower("evaluate", "-c", str(run / "config.yaml"), "--checkpoint", str(run / "checkpoints" / "best.ckpt"),
                        data, cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    row = next(line for line in evaluate.stdout.splitlines() if line.startswith("| model (test)"))
    summary = json.loads((run / "summary.json").read_text())
    got = [float(cell) for cell in row.split("|")[2:-1]]
    assert got == pytest.approx([summary[f"test/{m}@{k}"] for k in (10, 20) for m in ("hr", "ndcg", "mrr")], abs=5e-5)

    export = twotower("export", "--checkpoint", str(run / "checkpoints" / "best.ckpt"), "--out", str(tmp_path / "export"),
                      data, cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-3000:]
    recommend = twotower("recommend", "--model", str(tmp_path / "export"), "--history", ",".join(HISTORY), "--k", "5", cwd=tmp_path)
    assert recommend.returncode == 0, recommend.stderr[-3000:]
    got, expected = (json.loads(text)["items"] for text in (recommend.stdout, (OLD / "recommend_i00001-i00003.json").read_text()))
    assert [r["item_id"] for r in got] == [r["item_id"] for r in expected]
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-6)
    assert load_config([run / "config.yaml"]).model.mode == "id"
