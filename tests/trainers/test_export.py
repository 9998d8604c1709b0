"""`twotower export` and `twotower recommend` end to end: the exported item matrix is the
checkpoint's catalogue vectors, the exported towers rebuild the same model without Lightning or
DeepSpeed, and recommend's top-K is the brute-force ranking of the checkpoint's own model."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twotower.configs import load_config
from twotower.configs.serving import ServingConfig
from twotower.datamodules.datamodule import ShardDataModule
from twotower.modules.histories import pad_left
from twotower.modules.item_text import load_tokenizer
from twotower.modules.two_tower import TwoTower
from twotower.serving.export_format import Exported, load_exported
from twotower.serving.item_index import build_index
from twotower.serving.recommend import read_histories, recommend_once
from twotower.serving.recommender import Recommender
from twotower.trainers.evaluate import load_module
from twotower.trainers.export import write_exported

from exported_run import exported_run
from helpers import twotower


@pytest.fixture
def run(tiny_overrides, tmp_path_factory):
    return exported_run(tiny_overrides, tmp_path_factory)


@pytest.fixture
def checkpoint_model(run):
    """The trained TwoTower restored the training way (Lightning checkpoint + prepared shards)."""
    cfg = load_config([run.run / "config.yaml"])
    return load_module(str(run.checkpoint), ShardDataModule(cfg)).model, cfg


@pytest.mark.slow
def test_exported_matrix_is_the_checkpoints_catalogue_vectors(run, checkpoint_model):
    model, cfg = checkpoint_model
    expected = model.catalogue_vectors(cfg.eval.item_batch_size)
    exported = load_file(run.model / "item_vectors.safetensors")["vectors"]
    assert exported.dtype == torch.float32 and exported.shape == (model.num_items, cfg.model.dim)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)
    reloaded = load_exported(run.model)
    torch.testing.assert_close(reloaded.model.catalogue_vectors(64), expected, atol=1e-5, rtol=1e-5)
    assert reloaded.item_ids == json.loads((run.model / "item_ids.json").read_text()) and reloaded.index.ntotal == model.num_items
    assert (run.model / "item_encoder" / "config.json").is_file() and (run.model / "item_encoder" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_recommend_is_the_brute_force_ranking_without_the_history(run, checkpoint_model, tmp_path):
    model, cfg = checkpoint_model
    ids = json.loads((run.model / "item_ids.json").read_text())
    histories = [ids[0:5], ids[40:43], [ids[7]], ids[3:60]]
    (tmp_path / "histories.json").write_text(json.dumps(histories))
    result = twotower("recommend", "--model", str(run.model), "--json", str(tmp_path / "histories.json"), "--k", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["history"] for line in lines] == histories

    # Reference: the checkpoint's model, every item scored, the history masked out, sorted.
    table = model.catalogue_vectors(cfg.eval.item_batch_size)
    positions = [np.array([ids.index(i) for i in h]) for h in histories]
    with torch.no_grad():
        scores = model.scores(model.user_vectors(pad_left(positions, cfg.data.max_len), table), table)
    for row, seen, line in zip(scores, positions, lines):
        row[torch.from_numpy(seen)] = -torch.inf
        best = row.topk(10)
        got_scores = torch.tensor([item["score"] for item in line["items"]])
        torch.testing.assert_close(got_scores, best.values, atol=1e-4, rtol=1e-5)  # the same top-10 scores, in order
        got_positions = [ids.index(item["item_id"]) for item in line["items"]]
        torch.testing.assert_close(row[got_positions], got_scores, atol=1e-4, rtol=1e-5)  # ... by the right items
        assert not set(got_positions) & set(seen.tolist())


@pytest.mark.slow
def test_unknown_ids_are_named_or_skipped_with_a_warning(run, tmp_path):
    ids = json.loads((run.model / "item_ids.json").read_text())
    history = f"{ids[0]},no-such-item,{ids[1]},also-missing"
    failed = twotower("recommend", "--model", str(run.model), "--history", history, cwd=tmp_path)
    assert failed.returncode == 2 and "'no-such-item', 'also-missing'" in failed.stderr and "Traceback" not in failed.stderr
    skipped = twotower("recommend", "--model", str(run.model), "--history", history, "--k", "3", "--skip-unknown", cwd=tmp_path)
    assert skipped.returncode == 0 and "warning" in skipped.stderr and "no-such-item" in skipped.stderr
    line = json.loads(skipped.stdout)
    assert line["history"] == ids[:2] and len(line["items"]) == 3


@pytest.mark.slow
def test_loading_needs_neither_lightning_nor_deepspeed(run):
    probe = (
        "import json, sys\n"
        "from twotower.serving.export_format import load_exported\n"
        f"exported = load_exported({str(run.model)!r})\n"
        "vectors = exported.model.catalogue_vectors(64)\n"
        "assert (vectors - exported.vectors).abs().max() < 1e-4\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytorch_lightning', 'lightning', 'lightning_fabric', 'deepspeed'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == []


def test_round_trip_keeps_every_weight_including_a_fine_tuned_encoder(tiny_bert, tmp_path, capsys):
    cfg = load_config([], [f"model.item.encoder={tiny_bert}", "model.mode=id+text", "model.dim=8", "data.max_len=4",
                           "data.text_fields=[title]", "model.user.time_gaps=true", "model.user.actions=true"])
    torch.manual_seed(0)
    model = TwoTower(cfg.model, 3, num_actions=2).eval()
    with torch.no_grad():  # "fine-tune": the saved encoder must be this one, not the pretrained folder
        for p in model.item_tower.encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tokens = torch.tensor([[101, 2000, 102, 0], [101, 2001, 2002, 102], [101, 102, 0, 0]])
    model.item_tower.set_catalogue(tokens, torch.tensor([3, 4, 2]))
    vectors = model.catalogue_vectors(2)
    exported = Exported(cfg=cfg, model=model, item_ids=["a", "b", "c"], texts=["x", "y", "z"], vectors=vectors,
                        index=build_index(vectors.numpy(), ServingConfig()), tokenizer=load_tokenizer(tiny_bert), actions=["click", "buy"])
    write_exported(tmp_path / "export", exported, "no-checkpoint")
    reloaded = load_exported(tmp_path / "export")
    original = model.state_dict()
    assert reloaded.actions == ["click", "buy"] and {"user_tower.time_gaps.weight", "user_tower.actions.weight"} <= set(original)
    for name, tensor in reloaded.model.state_dict().items():
        torch.testing.assert_close(tensor, original[name], msg=name)
    torch.testing.assert_close(reloaded.model.catalogue_vectors(2), vectors)
    assert not list(tmp_path.glob(".export.*")), "the temporary folder is gone"

    # `recommend --json --skip-unknown` drops an unknown item together with its timestamp and action.
    history = [{"item_id": "a", "timestamp": 5, "action": "buy"}, {"item_id": "zz", "timestamp": 6, "action": "click"},
               {"item_id": "b", "timestamp": 900, "action": "click"}]
    (tmp_path / "histories.json").write_text(json.dumps([history]))
    [printed] = recommend_once(cfg, str(tmp_path / "export"), read_histories(None, str(tmp_path / "histories.json")), 1, skip_unknown=True)
    expected = Recommender(reloaded).recommend([["a", "b"]], 1, (), [[5, 900]], [["buy", "click"]])[0]
    assert printed["history"] == ["a", "b"] and [(r["item_id"], r["score"]) for r in printed["items"]] == expected


def test_large_catalogues_get_an_hnsw_index_that_finds_the_exact_top_10():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, 16)).astype(np.float32)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    exact = build_index(vectors, ServingConfig(hnsw_min_items=2001))
    hnsw = build_index(vectors, ServingConfig(hnsw_min_items=2000))
    assert type(exact).__name__ == "IndexFlatIP" and type(hnsw).__name__ == "IndexHNSWFlat"
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.search(queries, 10)[1], hnsw.search(queries, 10)[1])])
    assert recall >= 0.95
    brute = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    assert (exact.search(queries, 10)[1] == brute).all()
