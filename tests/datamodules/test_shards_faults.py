"""Corrupt and missing shards (issue 6, item 2): real shards from `twotower prepare`, damaged with
the standard library only (a tar cut inside a member or between members, a member's bytes
overwritten with garbage, a shard deleted, manifest.json edited, a stray shard added).

* data.on_error=raise (default): each fault is an error naming the file and the member, before
  training where it can be found there (missing shards, the manifest, evaluation splits); a run
  that fails leaves no summary.json.
* data.on_error=skip: the run completes and summary.json counts exactly the samples the damage
  cost, counted here independently from the undamaged tars.
* No rank hangs: a rank that skips still runs as many batches as the others (2 DDP processes).
"""
from __future__ import annotations

import io
import json
import shutil
import signal
import tarfile
from pathlib import Path

import pytest

from twotower.configs import load_config
from twotower.datamodules.datamodule import ShardDataModule, TrainSequences
from twotower.datamodules.prepare import prepare
from twotower.datamodules.readers import DataError
from twotower.datamodules.shards import Faults, ShardError, split_reader

from helpers import twotower
from shard_files import write_train_shards

GARBAGE = b"\x93NUMPY? no: \xff\xfe garbage \x00\x01" * 3


# ---- damage, with the standard library -------------------------------------------------------
def sample_keys(tar: Path) -> list[str]:
    """Sample keys of a tar, in file order (a member `KEY.EXT`)."""
    with tarfile.open(tar) as t:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))


def member(tar: Path, index: int, ext: str) -> str:
    return f"{sample_keys(tar)[index]}.{ext}"


def members_of(tar: Path, index: int) -> list[str]:
    """Sample `index`'s member names in file order (a cut before the first falls between samples)."""
    key = sample_keys(tar)[index]
    with tarfile.open(tar) as t:
        return [m.name for m in t.getmembers() if m.name.split(".", 1)[0] == key]


def garble(tar: Path, name: str) -> int:
    """Rewrite `tar` with member `name`'s bytes replaced by garbage; the samples this costs (1)."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    assert name in [m.name for m, _ in members]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            data = GARBAGE if m.name == name else data
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    return 1


def cut(tar: Path, name: str, inside: bool) -> int:
    """Truncate `tar` inside member `name`'s data, or right before its header (where `tarfile`
    sees a normal end of archive); the samples this costs: that member's and all after it."""
    with tarfile.open(tar) as t:
        m = t.getmember(name)
    keys = sample_keys(tar)
    with open(tar, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2 if inside else m.offset)
    return len(keys) - keys.index(name.split(".", 1)[0])


def smash_first_header(tar: Path) -> int:
    """Overwrite the first 512-byte header block with garbage; the samples this costs: all."""
    lost = len(sample_keys(tar))
    with open(tar, "r+b") as f:
        f.write(GARBAGE.ljust(512, b"#"))
    return lost


def edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# ---- data ------------------------------------------------------------------------------------
def overrides(tiny_bert: str, data: Path, run: Path, *extra: str) -> list[str]:
    """conftest's tiny run, with 50-sample shards: 6 train, 6 valid, 6 test and 3 item shards.
    `data.resample=false` everywhere: it is part of the data fingerprint, so a fit that set it
    alone would prepare the shards again (over the damage)."""
    return [f"model.item.encoder={tiny_bert}", "model.item.train_layers=-1", "model.dim=32",
            "data.synthetic.num_users=300", "data.synthetic.num_items=120", "data.synthetic.mean_events=15",
            "data.max_text_len=16", "data.max_len=20", "data.batch_size=64", "data.shuffle_buffer=50",
            "data.shard_max_count=50", "data.resample=false", "trainer.warmup_steps=2", "model.loss.num_negatives=32",
            f"data.dir={data}", f"run.dir={run}", *extra]


@pytest.fixture(scope="module")
def pristine(tiny_bert, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("shardfault-pristine") / "data"
    prepare(load_config([], overrides(tiny_bert, data, data.parent / "run")))
    return data


@pytest.fixture
def data(pristine, tmp_path) -> Path:
    """A copy of the prepared shards for this test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


def config(tiny_bert, data: Path, *extra: str):
    return load_config([], overrides(tiny_bert, data, data.parent / "run", *extra))


def read_training(module: ShardDataModule) -> int:
    return sum(len(batch[1]) for batch in module.train_dataset())


# ---- raise: every fault named by file and member ---------------------------------------------
def _garbage_train_npy(data: Path) -> str:
    tar = data / "train" / "train-000001.tar"
    name = member(tar, 17, "seq.npy")
    garble(tar, name)
    return rf"train-000001\.tar, member {name}: does not decode"


def _garbage_test_json(data: Path) -> str:
    tar = data / "test" / "test-000002.tar"
    name = member(tar, 3, "json")
    garble(tar, name)
    return rf"test-000002\.tar, member {name}: does not decode"


def _cut_inside_member(data: Path) -> str:
    tar = data / "train" / "train-000003.tar"
    name = member(tar, 30, "seq.npy")
    cut(tar, name, inside=True)
    return rf"train-000003\.tar, member {name}: reading stopped here \(ReadError: unexpected end of data\)"


def _cut_between_members(data: Path) -> str:
    tar = data / "train" / "train-000004.tar"
    cut(tar, members_of(tar, 40)[0], inside=False)
    return rf"train-000004\.tar, member {members_of(data / 'train' / 'train-000004.tar', 39)[-1]}: holds 40 sample\(s\), the manifest says 50"


def _smashed_header(data: Path) -> str:
    smash_first_header(data / "train" / "train-000002.tar")
    return r"train-000002\.tar: not a readable tar file \(ReadError: invalid header\) \[50 sample\(s\) unreadable\]"


def _missing_shard(data: Path) -> str:
    (data / "train" / "train-000002.tar").unlink()
    return r"train-000002\.tar: listed in manifest\.json, not found \[50 sample\(s\) unreadable\]"


def _manifest_counts(data: Path) -> str:
    edit_manifest(data, lambda m: m["counts"].update(test=m["counts"]["test"] + 7))
    return r"manifest\.json, member counts\.test: 307, but shard_counts of the test shards add up to 300"


def _unlisted_shard(data: Path) -> str:
    edit_manifest(data, lambda m: m["shards"]["valid"].remove("valid/valid-000004.tar"))
    return r"valid-000004\.tar: not listed in manifest\.json"


def _wrong_shard_count(data: Path) -> str:
    edit_manifest(data, lambda m: m["shard_counts"].update({"train/train-000000.tar": 51, "train/train-000005.tar": 49}))
    return r"train-00000[05]\.tar, member \d+\.time\.npy: holds 50 sample\(s\), the manifest says (51|49)"


def _garbage_item(data: Path) -> str:
    tar = data / "items" / "items-000001.tar"
    name = member(tar, 4, "tokens.npy")
    garble(tar, name)
    return rf"items-000001\.tar, member {name}: does not decode.*item shards are never skipped"


def _missing_item_shard(data: Path) -> str:
    (data / "items" / "items-000002.tar").unlink()
    return r"items-000002\.tar: listed in manifest\.json, not found.*item shards are never skipped"


FAULTS = {  # name: (damage -> expected message, where it is found: setup | eval | train)
    "garbage train npy": (_garbage_train_npy, "train"),
    "garbage test json": (_garbage_test_json, "eval"),
    "cut inside a member": (_cut_inside_member, "train"),
    "cut between members": (_cut_between_members, "train"),
    "smashed first header": (_smashed_header, "train"),
    "missing shard": (_missing_shard, "setup"),
    "manifest counts": (_manifest_counts, "setup"),
    "unlisted shard": (_unlisted_shard, "setup"),
    "wrong shard count": (_wrong_shard_count, "train"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_raise_names_file_and_member(tiny_bert, data, fault):
    damage, where = FAULTS[fault]
    expected = damage(data)
    cfg = config(tiny_bert, data)
    with pytest.raises(ShardError, match=expected):
        module = ShardDataModule(cfg)  # setup faults: before anything else
        module.setup("fit")  # evaluation splits: before the first training step
        assert where == "train"
        read_training(module)


def test_a_fault_in_a_loader_worker_reaches_the_command_named(tiny_bert, data):
    expected = _garbage_train_npy(data)
    loader = ShardDataModule(config(tiny_bert, data, "data.num_workers=1")).train_dataloader()
    with pytest.raises(ShardError, match=expected):
        list(loader)


@pytest.mark.parametrize("damage", [_garbage_item, _missing_item_shard])
def test_an_item_is_never_skipped(tiny_bert, data, damage):
    expected = damage(data)
    with pytest.raises(ShardError, match=expected):
        ShardDataModule(config(tiny_bert, data, "data.on_error=skip"))


# ---- skip: counted exactly, and training reads on --------------------------------------------
def damage_many(data: Path) -> tuple[int, int, list[str]]:
    """Seven kinds of damage; (samples they cost, shards wholly lost, names that must be reported)."""
    train, lost, names = data / "train", 0, []
    for i, ext in ((5, "seq.npy"), (33, "json")):
        names.append(member(train / "train-000001.tar", i, ext))
        lost += garble(train / "train-000001.tar", names[-1])
    names.append(member(train / "train-000003.tar", 30, "seq.npy"))
    lost += cut(train / "train-000003.tar", names[-1], inside=True)
    lost += cut(train / "train-000004.tar", members_of(train / "train-000004.tar", 40)[0], inside=False)
    lost += smash_first_header(train / "train-000000.tar")
    names.append("train-000000.tar")
    lost += len(sample_keys(train / "train-000005.tar"))
    (train / "train-000005.tar").unlink()
    names.append("train-000005.tar")
    for split, i, ext in (("valid", 7, "history.npy"), ("test", 11, "json")):
        names.append(member(data / split / f"{split}-000001.tar", i, ext))
        lost += garble(data / split / f"{split}-000001.tar", names[-1])
    shutil.copy(data / "valid" / "valid-000000.tar", data / "valid" / "stray-000000.tar")  # unlisted: not read, nothing lost
    names.append("stray-000000.tar")
    return lost, 2, names


def test_skip_reads_on_and_counts_what_was_lost(tiny_bert, data):
    lost, shards, names = damage_many(data)
    assert lost == 2 + 20 + 10 + 50 + 50 + 2
    # Two loader workers: each logs what it skips to the fault log, and the report adds them up.
    module = ShardDataModule(config(tiny_bert, data, "data.on_error=skip", "data.num_workers=2"), fault_log=data.parent / "faults")
    module.setup("fit")
    assert len(module.cases("valid")) == len(module.cases("test")) == 299
    assert sum(len(batch[1]) for batch in module.train_dataloader()) == 300 - (2 + 20 + 10 + 50 + 50)
    counts, report = module.fault_report()
    assert counts == {"data/faults": 9, "data/skipped_samples": lost, "data/skipped_shards": shards}
    for name in names:
        assert any(name in fault["message"] for fault in report), name


def test_fit_skip_completes_and_summary_counts_every_lost_sample(tiny_bert, data):
    lost, shards, names = damage_many(data)
    run = data.parent / "run"
    result = twotower("fit", *overrides(tiny_bert, data, run, "data.on_error=skip", "trainer.max_epochs=1"),
                      cwd=data.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "is up to date" in result.stderr  # the damaged shards were read, not prepared again
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data/skipped_samples"] == lost and summary["data/skipped_shards"] == shards
    assert summary["epochs"] == 1 and summary["steps"] == 3  # ceil(168 / 64) batches of what was readable
    report = json.loads((run / "data_faults.json").read_text())
    for name in names:
        assert any(name in fault["message"] for fault in report), name
        assert name in result.stderr, f"{name} was not logged"


def test_fit_raise_stops_naming_the_member_and_claims_no_success(tiny_bert, data):
    expected = _garbage_train_npy(data)
    run = data.parent / "run"
    result = twotower("fit", *overrides(tiny_bert, data, run, "trainer.max_epochs=2"), cwd=data.parent, timeout=300)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "data error" in result.stderr and __import__("re").search(expected, result.stderr), result.stderr[-4000:]
    assert not (run / "summary.json").exists() and not (run / "checkpoints" / "best.ckpt").exists()


# ---- no rank hangs ---------------------------------------------------------------------------
@pytest.mark.parametrize("resample", [False, True])
def test_a_rank_that_skips_runs_as_many_batches_as_the_others(tmp_path, resample):
    urls = write_train_shards(tmp_path, [30, 30, 30, 30])
    cut(Path(urls[1]), member(Path(urls[1]), 3, "seq.npy"), inside=True)  # a few samples left
    garble(Path(urls[3]), member(Path(urls[3]), 0, "seq.npy"))
    counts = []
    for rank in range(2):
        reader = split_reader("train", Faults("skip"), {u: 30 for u in urls})
        data = TrainSequences(urls, 10, 8, 16, 0, rank, 2, resample=resample, batches_per_epoch=9, reader=reader)
        counts.append([sum(1 for _ in data) for _epoch in range(3)])
    assert counts == [[9, 9, 9], [9, 9, 9]]


def test_an_endless_stream_with_no_readable_shard_stops_instead_of_spinning(tmp_path):
    urls = write_train_shards(tmp_path, [5, 5])
    for url in urls:
        for i in range(5):
            garble(Path(url), member(Path(url), i, "seq.npy"))
    data = TrainSequences(urls, 10, 8, 16, 0, 0, 1, resample=True, batches_per_epoch=3,
                          reader=split_reader("train", Faults("skip"), None))
    signal.alarm(60)  # a regression would spin forever
    try:
        with pytest.raises(DataError, match=r"not one usable sample in any of the 2 training shard"):
            list(data)
    finally:
        signal.alarm(0)


DDP = ["trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_threads=1", "trainer.max_epochs=1"]


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_ddp_a_damaged_shard_on_one_rank_hangs_no_rank(tiny_bert, data, on_error):
    """2 gloo processes, 6 shards dealt 3 per rank (one epoch): one rank's shard is damaged.
    skip: that rank skips and the other does not; both still run ceil(300 / (64 x 2)) = 3 steps,
    and the summary (rank 0's) counts what was skipped, whichever rank skipped it. raise: the
    run stops (the other rank too, not left waiting), naming file and member, with no summary."""
    tar = data / "train" / "train-000001.tar"
    name = member(tar, 5, "json")
    lost = garble(tar, name) + cut(tar, member(tar, 20, "seq.npy"), inside=True)
    run = data.parent / "run"
    result = twotower("fit", *overrides(tiny_bert, data, run, f"data.on_error={on_error}", *DDP), cwd=data.parent,
                      timeout=240, threads=1)
    assert "is up to date" in result.stderr  # the damaged shards were read, not prepared again
    if on_error == "raise":
        assert result.returncode != 0 and f"train-000001.tar, member {name}: does not decode" in result.stderr
        assert not (run / "summary.json").exists()
        return
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["data/skipped_samples"] == lost == 1 + 30
