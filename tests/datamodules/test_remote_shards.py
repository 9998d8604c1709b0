"""Shards on object storage (issue 20, item 4): `data.shards_url` against real servers that the
tests start, moto's S3 server and the standard library's read-only HTTP server, each serving a
shard set that `twotower prepare` wrote locally and that was then uploaded (S3) or served as it is.

* A 2-rank fit (gloo) streams its shards from S3 with no local `data.dir`, and ends with the
  metrics of the same fit on the local folder; evaluate (over HTTP) and export (from S3) of its
  checkpoint read the manifest, the catalogue and the test split from the server.
* The manifest, the catalogue and every evaluation case read from either server equal the local ones.
* A missing shard, and a truncated one (its first N bytes uploaded), are named exactly as the
  same damage in the local folder is, the shard's URL in place of its path.
"""
from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import tarfile
import threading
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from twotower.configs import load_config
from twotower.configs.schema import DataConfig
from twotower.datamodules.datamodule import ShardDataModule
from twotower.datamodules.prepare import prepare
from twotower.datamodules.readers import DataError
from twotower.datamodules.shards import Faults, ShardError, split_reader

from helpers import free_port, printed_metrics, twotower

BUCKET = "shards"


def overrides(tiny_bert: str, *extra: str) -> list[str]:
    """conftest's tiny run with 50-sample shards (6 train, 6 valid, 6 test, 3 item shards);
    `extra` says where the data is (data.dir, data.shards_url)."""
    return [f"model.item.encoder={tiny_bert}", "model.item.train_layers=-1", "model.dim=32",
            "data.synthetic.num_users=300", "data.synthetic.num_items=120", "data.synthetic.mean_events=15",
            "data.max_text_len=16", "data.max_len=20", "data.batch_size=64", "data.shuffle_buffer=50",
            "data.shard_max_count=50", "trainer.warmup_steps=2", "model.loss.num_negatives=32", *extra]


@pytest.fixture(scope="module")
def pristine(tiny_bert, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("remote-pristine") / "data"
    prepare(load_config([], overrides(tiny_bert, f"data.dir={data}")))
    return data


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free local port, found by s3fs (in this process and in every process
    it starts) through the AWS variables a user would set. Yields `publish(folder, name)`: every
    file of `folder` uploaded under s3://BUCKET/name (as `aws s3 sync` would), returning that URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    none = tmp_path_factory.mktemp("no-aws") / "none"  # no user AWS config or credentials file is read
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(none), "AWS_SHARED_CREDENTIALS_FILE": str(none),
           "AWS_EC2_METADATA_DISABLED": "true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir(BUCKET)

        def publish(folder: Path, name: str) -> str:
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                fs.put_file(str(path), f"{BUCKET}/{name}/{path.relative_to(folder).as_posix()}")
            return f"s3://{BUCKET}/{name}"

        yield publish
    server.stop()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """Python's http.server, read-only, on a free local port. Yields `publish(folder, name)`: the
    folder served at http://127.0.0.1:PORT/name (a copy: the server's root is its own)."""
    root = tmp_path_factory.mktemp("http-root")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def publish(folder: Path, name: str) -> str:
        shutil.copytree(folder, root / name)
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"

    yield publish
    server.shutdown()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request on stderr otherwise
        pass


@pytest.fixture(params=["s3", "http"])
def store(request):
    """Each server's `publish`, in turn."""
    return request.getfixturevalue({"s3": "s3", "http": "web"}[request.param])


def remote_config(tiny_bert, url: str, where: Path, *extra: str):
    """The tiny config reading `url`, its data.dir a folder that does not exist; where the item
    catalogue is cached per machine (`data.cache_dir`), a cache of its own, so that the catalogue
    is read from the server and not from an earlier test's cache."""
    cache = [f"data.cache_dir={where / 'catalogue-cache'}"] if "cache_dir" in {f.name for f in fields(DataConfig)} else []
    return load_config([], overrides(tiny_bert, f"data.shards_url={url}", f"data.dir={where / 'absent'}", *cache, *extra))


def local_config(tiny_bert, data: Path, *extra: str):
    return load_config([], overrides(tiny_bert, f"data.dir={data}", *extra))


# ---- the same data ---------------------------------------------------------------------------
def test_manifest_catalogue_and_cases_read_from_the_server_equal_the_local_ones(tiny_bert, pristine, store, tmp_path):
    url = store(pristine, f"whole-{tmp_path.name}")
    remote, local = ShardDataModule(remote_config(tiny_bert, url, tmp_path)), ShardDataModule(local_config(tiny_bert, pristine))
    assert remote.folder == url and remote.manifest == local.manifest
    assert remote.urls["train"] == [f"{url}/{name}" for name in local.manifest["shards"]["train"]]
    assert remote.catalogue.item_ids == local.catalogue.item_ids and remote.catalogue.texts == local.catalogue.texts
    assert torch.equal(remote.catalogue.tokens, local.catalogue.tokens)
    for split in ("valid", "test"):
        cases, expected = remote.cases(split), local.cases(split)
        assert len(cases) == len(expected) == local.manifest["counts"][split] > 0
        for got, want in zip(cases, expected):
            assert got["json"] == want["json"] and np.array_equal(got["history.npy"], want["history.npy"])
    assert sum(len(batch[1]) for batch in remote.train_dataset()) == local.manifest["counts"]["train_users"]
    assert not (tmp_path / "absent").exists()


def test_loader_workers_stream_remote_shards(tiny_bert, pristine, store, tmp_path):
    """Two DataLoader worker processes (forked after this process has talked to the server) each
    open their own connections and read their share of the shards."""
    url = store(pristine, f"workers-{tmp_path.name}")
    module = ShardDataModule(remote_config(tiny_bert, url, tmp_path, "data.num_workers=2", "data.resample=false"))
    assert sum(len(batch[1]) for batch in module.train_dataloader()) == module.manifest["counts"]["train_users"]


def test_a_set_that_is_not_there_is_named_with_its_url(tiny_bert, store, tmp_path):
    (tmp_path / "empty").mkdir()
    url = store(tmp_path / "empty", f"empty-{tmp_path.name}")
    with pytest.raises(DataError, match=rf"^{re.escape(url)}/manifest\.json not found \(data\.shards_url\): upload"):
        ShardDataModule(remote_config(tiny_bert, url, tmp_path))


# ---- damage: named as locally ----------------------------------------------------------------
def _missing(data: Path) -> None:
    (data / "train" / "train-000002.tar").unlink()


def _truncated_inside_a_member(data: Path) -> None:
    """The first N bytes of a shard: N halfway into a member of its 31st sample."""
    tar = data / "train" / "train-000003.tar"
    with tarfile.open(tar) as t:
        member = [m for m in t.getmembers() if m.name.endswith(".seq.npy")][30]
    with open(tar, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def _truncated_between_members(data: Path) -> None:
    """The first N bytes of a shard: N where a header begins (tarfile sees a normal end of archive)."""
    tar = data / "train" / "train-000004.tar"
    with tarfile.open(tar) as t:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in t.getmembers()))
        header = min(m.offset for m in t.getmembers() if m.name.split(".", 1)[0] == keys[40])
    with open(tar, "r+b") as f:
        f.truncate(header)


DAMAGE = {"missing shard": (_missing, "setup", "missing"), "truncated inside a member": (_truncated_inside_a_member, "train", "truncated"),
          "truncated between members": (_truncated_between_members, "train", "count")}


def _fault_of(cfg) -> ShardError:
    """The error the damage raises (data.on_error=raise): before training (a missing shard), or
    when the training stream reaches it."""
    with pytest.raises(ShardError) as info:
        module = ShardDataModule(cfg)
        sum(len(batch[1]) for batch in module.train_dataset())
    return info.value


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_remote_shard_is_named_as_a_local_one(tiny_bert, pristine, store, tmp_path, damage):
    """The same damage in a local copy and on the server: the same fault, the same message, with
    the shard's URL where the local one has its path."""
    harm, _, kind = DAMAGE[damage]
    local = Path(shutil.copytree(pristine, tmp_path / "data"))
    harm(local)
    url = store(local, f"{damage.replace(' ', '-')}-{tmp_path.name}")
    expected, got = _fault_of(local_config(tiny_bert, local)), _fault_of(remote_config(tiny_bert, url, tmp_path))
    assert expected.fault.kind == got.fault.kind == kind
    assert got.fault == replace(expected.fault, shard=expected.fault.shard.replace(str(local), url))
    assert str(got) == str(expected).replace(str(local), url)
    assert got.fault.shard.startswith(f"{url}/train/train-00000")


def test_a_remote_shard_gone_after_the_check_is_missing_as_a_local_one(pristine, store, tmp_path):
    """A shard that disappears between the manifest check and its reading (the reader's own open)."""
    url = store(pristine, f"gone-{tmp_path.name}")
    faults = {}
    for base in (str(tmp_path / "data"), url):
        reader = split_reader("train", Faults("skip", verbose=False), {f"{base}/train/train-000009.tar": 50})
        assert list(reader.shard(f"{base}/train/train-000009.tar")) == []
        (faults[base],) = reader.faults.recorded.values()
    local, remote = faults[str(tmp_path / "data")], faults[url]
    assert remote == replace(local, shard=f"{url}/train/train-000009.tar")
    assert (remote.kind, remote.problem, remote.lost, remote.whole) == ("missing", "shard not found", 50, True)


# ---- end to end: 2 ranks from S3 -------------------------------------------------------------
TWO_CPU = ["trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_threads=1", "trainer.max_epochs=2"]


def _fit(tiny_bert, run: Path, *where: str) -> dict:
    result = twotower("fit", *overrides(tiny_bert, *where, *TWO_CPU), f"run.dir={run}", cwd=run.parent, timeout=400, threads=1)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="module")
def fits(tiny_bert, pristine, s3, tmp_path_factory) -> dict:
    """The same 2-rank fit reading the local folder and reading its upload on S3 (no data.dir)."""
    root = tmp_path_factory.mktemp("remote-fits")
    url = s3(pristine, "fit")
    _fit(tiny_bert, root / "local", f"data.dir={pristine}")
    _fit(tiny_bert, root / "s3", f"data.shards_url={url}", f"data.dir={root / 'absent'}")
    assert not (root / "absent").exists()
    return {"local": root / "local", "s3": root / "s3", "url": url}


@pytest.mark.slow
def test_a_two_rank_fit_streams_from_s3_with_the_metrics_of_the_local_one(fits):
    local, remote = (json.loads((fits[name] / "summary.json").read_text()) for name in ("local", "s3"))
    assert remote["steps"] == local["steps"] > 0 and remote["epochs"] == local["epochs"]
    compared = [key for key in local if key.startswith(("test/", "best/", "popularity/test/"))]
    assert len(compared) >= 7
    for key in compared:
        assert remote[key] == pytest.approx(local[key], abs=1e-4), key
    assert f"shards_url: {fits['url']}" in (fits["s3"] / "config.yaml").read_text()


@pytest.mark.slow
def test_evaluate_over_http_and_export_from_s3_read_no_local_data(fits, pristine, web, tmp_path):
    run = fits["s3"]
    checkpoint = str(run / "checkpoints" / "best.ckpt")
    url = web(pristine, "evaluate")
    evaluate = twotower("evaluate", "-c", str(run / "config.yaml"), "--checkpoint", checkpoint, f"data.shards_url={url}",
                        cwd=tmp_path, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    for name, value in printed_metrics(evaluate.stdout, "model (test)").items():
        assert value == pytest.approx(summary[f"test/{name}"], abs=1e-4), name
    out = tmp_path / "export"
    export = twotower("export", "--checkpoint", checkpoint, "--out", str(out), cwd=tmp_path, timeout=300)
    assert export.returncode == 0, export.stderr[-4000:]
    assert json.loads((out / "item_ids.json").read_text()) == json.loads((pristine / "item_ids.json").read_text())
