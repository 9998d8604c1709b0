"""Configs: defaults, files merged in order, overrides, and errors that name the key."""
from pathlib import Path

import pytest

from twotower.configs import ConfigError, load_config, to_yaml
from twotower.configs.loader import from_container

CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*/*.yaml") if p.parent.name != "sweep")
"Config files (W&B sweep files under configs/sweep are checked by test_sweep)."


def test_defaults_are_the_built_in_data_and_the_packaged_minilm():
    cfg = load_config()
    assert cfg.data.source == "synthetic" and cfg.model.item.encoder == "minilm"
    assert cfg.model.user.max_len == cfg.data.max_len  # interpolated, not duplicated


def test_files_merge_in_order_and_overrides_come_last(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("model:\n  dim: 32\n  mode: id\n")
    second.write_text("model:\n  dim: 48\n")
    cfg = load_config([first, second], ["data.max_len=7"])
    assert (cfg.model.dim, cfg.model.mode, cfg.data.max_len, cfg.model.user.max_len) == (48, "id", 7, 7)


@pytest.mark.parametrize("override,expected", [
    ("data.batchsize=3", "'data.batch_size'"),
    ("model.user.layer=3", "'model.user.layers'"),
    ("trainer.max_epoch=3", "'trainer.max_epochs'"),
])
def test_unknown_key_names_the_key_and_the_closest_spelling(override, expected):
    with pytest.raises(ConfigError, match=rf"unknown config key '{override.split('=')[0]}'.*{expected}"):
        load_config([], [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'trainer.lr_rate'.*'trainer.lr'"):
        load_config([bad])


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=abc", "data.batch_size"),
    ("model.mode=bert", "model.mode"),
    ("model.item.pooling=max", "model.item.pooling"),
    ("split.cold_item_fraction=1.5", "split.cold_item_fraction"),
    ("data.source=table", "data.interactions"),
    ("model.dim=31", "model.user.heads"),
    ("trainer.strategy=deepspeed trainer.zero_stage=3", "trainer.devices=1"),  # ZeRO in one CPU process
    ("trainer.on_nan=skip trainer.strategy=deepspeed trainer.devices=2", "trainer.on_nan"),
    ("trainer.on_nan=sometimes", "trainer.on_nan"),
    ("data.since=10 data.until=5", "data.since"),
    ("update.replay_fraction=1", "update.replay_fraction"),
    ("serving.reload_interval_s=-1", "serving.reload_interval_s"),
])
def test_bad_values_fail_at_load_time_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], override.split())


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config([], ["model.mode=id", "run.name=x"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_config([tmp_path / "config.yaml"]) == cfg


def test_from_container_restores_the_dataclasses():
    from omegaconf import OmegaConf

    cfg = load_config([], ["model.dim=16", "model.user.heads=4"])
    assert from_container(OmegaConf.to_container(OmegaConf.structured(cfg))) == cfg


def test_a_stored_config_older_than_a_key_gets_the_behaviour_it_was_trained_with():
    """Checkpoints and exports written before model.item.text_adapter existed projected the pooled
    text vector alone (`linear`); the key's default is now `mlp`."""
    from omegaconf import OmegaConf

    stored = OmegaConf.to_container(OmegaConf.structured(load_config([], ["model.mode=text"])))
    assert from_container(stored).model.item.text_adapter == "mlp"
    del stored["model"]["item"]["text_adapter"]
    assert from_container(stored).model.item.text_adapter == "linear"
    assert load_config([], ["model.mode=text"]).model.item.text_adapter == "mlp"  # new configs: the default


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_yaml_loads_and_opens_with_the_command_that_runs_it(path):
    assert path.read_text().startswith("# ") and "twotower " in path.read_text().splitlines()[0]
    load_config([path])


@pytest.mark.parametrize("overrides, num_items, full", [
    (["model.mode=id"], 1000, True),
    (["model.mode=id", "data.batch_size=4", "data.max_len=5", "model.loss.full_max_logits=20000"], 1000, True),
    (["model.mode=id", "data.batch_size=4", "data.max_len=5", "model.loss.full_max_logits=19999"], 1000, False),  # too many logits
    (["model.mode=id+text", "model.item.train_layers=0"], 1000, True),  # frozen, cached encoder: a lookup
    (["model.mode=text", "model.item.train_layers=0", "model.item.cache_frozen=false"], 1000, False),
    (["model.mode=text", "model.item.train_layers=1"], 1000, False),  # a layer trains: encode per batch
    (["model.mode=text", "model.item.train_layers=1", "model.loss.refresh_every=5"], 1000, False),  # stale table: asked for
    (["model.mode=text", "model.loss.candidates=full"], 1000, True),
])
def test_auto_candidates_pick_the_full_softmax_only_where_items_are_cheap(overrides, num_items, full):
    from twotower.modules.lit_two_tower import uses_full_softmax

    assert uses_full_softmax(load_config([], overrides), num_items) is full
