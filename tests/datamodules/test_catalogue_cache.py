"""The item catalogue, cached once per machine (`datamodules.catalogue`): two processes racing for it
build it once and read the same files; its tensors are the item shards' contents (read here with
`tarfile` and numpy, not through the shard readers); an item index no shard holds is still the error
naming manifest.json; a corrupted, truncated or half-built cache folder is never used, and a shard
changed after the build gives a new one."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import webdataset as wds

from twotower.configs import load_config
from twotower.datamodules.catalogue import load_catalogue
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import prepare
from twotower.datamodules.shards import ShardError


@pytest.fixture(scope="module")
def prepared(tiny_bert, tmp_path_factory) -> Path:
    """The tiny synthetic set (120 items) in 3 item shards of 40."""
    from conftest import tiny

    cfg = load_config([], tiny(tiny_bert, tmp_path_factory.mktemp("catalogue")) + ["data.shard_max_count=40"])
    prepare(cfg)
    return Path(cfg.data.dir)


@pytest.fixture
def data(prepared, tmp_path) -> Path:
    """A copy of the prepared set for this test to change (times kept, as `cp -p` keeps them)."""
    return Path(shutil.copytree(prepared, tmp_path / "data"))


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def shard_contents(folder: Path) -> dict:
    """The reference: every item member of every item shard, read with tarfile and numpy, in index order."""
    items = {}
    for name in manifest_of(folder)["shards"]["items"]:
        with tarfile.open(folder / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in {n.split(".")[0] for n in members}:
            meta = json.loads(members[f"{key}.json"])
            items[meta["index"]] = (meta, np.load(io.BytesIO(members[f"{key}.tokens.npy"])), members[f"{key}.txt"].decode())
    width = max(len(t) for _, t, _ in items.values())
    tokens = np.zeros((len(items), width), dtype=np.int64)
    for i, (_, t, _) in items.items():
        tokens[i, :len(t)] = t
    ordered = [items[i] for i in range(len(items))]
    return {"tokens": tokens, "lengths": [len(t) for _, t, _ in ordered], "train_counts": [m["train_count"] for m, _, _ in ordered],
            "cold": [m["cold"] for m, _, _ in ordered], "item_ids": [m["item_id"] for m, _, _ in ordered], "texts": [x for _, _, x in ordered]}


def assert_matches(catalogue, expected: dict) -> None:
    assert catalogue.tokens.dtype == torch.int32
    assert np.array_equal(catalogue.tokens.numpy(), expected["tokens"])
    assert catalogue.lengths.tolist() == expected["lengths"]
    assert catalogue.train_counts.tolist() == expected["train_counts"]
    assert catalogue.cold.tolist() == expected["cold"]
    assert list(catalogue.item_ids) == expected["item_ids"] and catalogue.item_ids == expected["item_ids"]
    assert list(catalogue.texts) == expected["texts"]
    assert catalogue.item_ids[-1] == expected["item_ids"][-1] and catalogue.texts[3:5] == expected["texts"][3:5]


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("catalogue-*"))


def test_the_cached_catalogue_is_the_item_shards_contents_memory_mapped(data, tmp_path):
    cache = tmp_path / "cache"
    catalogue = load_catalogue(data, manifest_of(data), cache)
    assert_matches(catalogue, shard_contents(data))
    (entry,) = entries(cache)
    maps = Path("/proc/self/maps").read_text()
    assert str(entry / "tokens.npy") in maps and str(entry / "texts.npy") in maps  # mapped, not read into memory
    again = load_catalogue(data, manifest_of(data), cache)  # a second load reads the same files
    assert entries(cache) == [entry] and torch.equal(again.tokens, catalogue.tokens)


def test_the_data_module_reads_the_catalogue_from_data_cache_dir(prepared, tiny_bert, tmp_path):
    from conftest import tiny

    cfg = load_config([], tiny(tiny_bert, prepared.parent) + ["data.shard_max_count=40", f"data.cache_dir={tmp_path / 'cache'}"])
    module = ShardDataModule(cfg)
    assert module.num_items == 120 and len(entries(tmp_path / "cache")) == 1
    assert_matches(module.catalogue, shard_contents(prepared))


def _race(rank: int, folder: str, cache: str, out: str, barrier) -> None:
    """One process: wait for the other, load, report what it got and which folder it read."""
    barrier.wait()
    catalogue = load_catalogue(Path(folder), manifest_of(Path(folder)), cache)
    (entry,) = entries(Path(cache))
    torch.save({"tokens": catalogue.tokens.clone(), "ids": list(catalogue.item_ids), "inode": entry.stat().st_ino,
                "built": (entry / "check.json").stat().st_mtime_ns}, f"{out}/rank{rank}.pt")


def test_two_processes_racing_build_it_once_and_read_the_same_files(data, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    barrier = mp.get_context("spawn").Barrier(2)
    mp.start_processes(_race, args=(str(data), str(cache), str(out), barrier), nprocs=2, start_method="spawn", join=True)
    got = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    assert got[0]["inode"] == got[1]["inode"] and got[0]["built"] == got[1]["built"], "built twice"
    expected = shard_contents(data)
    for g in got:
        assert np.array_equal(g["tokens"].numpy(), expected["tokens"]) and g["ids"] == expected["item_ids"]
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [entries(cache)[0].name], "a temporary folder is left"


def _drop_item(folder: Path, index: int) -> None:
    """Rewrite the item shard that holds `index` without it, shard_counts made to agree (the manifest's
    item count still says every item)."""
    manifest = manifest_of(folder)
    for name in manifest["shards"]["items"]:
        samples = list(wds.WebDataset(str(folder / name), shardshuffle=False))
        kept = [s for s in samples if json.loads(s["json"])["index"] != index]
        if len(kept) < len(samples):
            with wds.TarWriter(str(folder / name)) as sink:
                for s in kept:
                    sink.write({k: v for k, v in s.items() if k != "__url__" and not k.startswith("__local")})
            manifest["shard_counts"][name] -= 1
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_an_item_no_shard_holds_is_the_error_naming_the_manifest_and_nothing_is_cached(data, tmp_path):
    _drop_item(data, 57)
    cache = tmp_path / "cache"
    with pytest.raises(ShardError, match=r"manifest\.json, member counts\.items: 120 items, but item index 57 is in no item shard "
                                         r"\(an item cannot be skipped\)"):
        load_catalogue(data, manifest_of(data), cache)
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]


def test_a_shard_changed_after_the_build_gives_a_new_catalogue(data, tmp_path):
    cache = tmp_path / "cache"
    load_catalogue(data, manifest_of(data), cache)
    _drop_item(data, 3)
    with pytest.raises(ShardError, match="item index 3 is in no item shard"):
        load_catalogue(data, manifest_of(data), cache)  # not the stale cache of the whole catalogue


def _overwrite(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\x07" * 64)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


@pytest.mark.parametrize("damage", ["overwritten tokens", "truncated texts", "no check.json"])
def test_a_damaged_cache_folder_is_never_used_but_built_again(data, tmp_path, damage):
    cache = tmp_path / "cache"
    load_catalogue(data, manifest_of(data), cache)
    (entry,) = entries(cache)
    {"overwritten tokens": lambda: _overwrite(entry / "tokens.npy"), "truncated texts": lambda: _truncate(entry / "texts.npy"),
     "no check.json": lambda: (entry / "check.json").unlink()}[damage]()
    time.sleep(0.01)
    assert_matches(load_catalogue(data, manifest_of(data), cache), shard_contents(data))
    assert entries(cache) == [entry]


def test_a_half_built_folder_left_by_a_crash_is_never_used(data, tmp_path):
    """A build killed mid-way leaves its temporary folder (`atomic_folder`'s `.NAME.tmp-PID`), never
    the folder's own name: the next load builds the whole catalogue."""
    cache = tmp_path / "cache"
    load_catalogue(data, manifest_of(data), cache)
    (entry,) = entries(cache)
    partial = entry.parent / f".{entry.name}.tmp-999999"
    entry.rename(partial)
    _truncate(partial / "tokens.npy")
    assert_matches(load_catalogue(data, manifest_of(data), cache), shard_contents(data))
