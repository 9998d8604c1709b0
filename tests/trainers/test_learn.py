"""`twotower learn`: a model trained on the early part of the built-in timeline follows an event
stream holding the rest (new items included, and records it must skip). Checked: every usable
event is learnt exactly once (the Parquet parts it commits hold each stream offset once, per user
the stream's events), also when the learner is SIGKILLed at random moments and restarted, whose
final weights then equal an uninterrupted run's; items from the stream reach the export; bad
records are counted and skipped; two gloo processes split the stream by user; and `prepare
--append` of the parts gives the prepared events plus exactly the stream's."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from twotower.configs import load_config
from twotower.datamodules.prepare import event_tables, prepare_append
from twotower.datamodules.synthetic import TIMELINE, write_time_split
from twotower.streaming import open_stream

from helpers import twotower

BAD_EVENTS = [
    {"user_id": "u-bad", "item_id": "no-such-item", "timestamp": 1.0},  # unknown_item
    {"user_id": "u-bad", "item_id": "{item}", "timestamp": 1.0, "colour": "red"},  # unknown_fields
    {"user_id": "u-bad", "item_id": "{item}", "timestamp": "yesterday"},  # malformed
]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """(folder, overrides, the early/late tables): a tiny id+text model fitted on the first 70 % of the timeline."""
    from conftest import tiny

    folder = tmp_path_factory.mktemp("learn")
    overrides = tiny(tiny_bert, folder) + ["model.mode=id+text", "trainer.max_epochs=1"]
    paths = write_time_split(load_config([], overrides).data.synthetic, 0.7 * TIMELINE, folder / "tables")
    overrides += ["data.source=table", f"data.interactions={paths['early']}", f"data.items={paths['early_items']}"]
    fit = twotower("fit", *overrides, cwd=folder)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return folder, overrides, paths


def fill_stream(url: str, paths: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """The late events (the bad records among them) and the new items appended to the stream at `url`;
    returns (the usable events with their offsets, the new item ids)."""
    late = pd.read_csv(paths["late"], dtype={"user_id": str, "item_id": str}).sort_values("timestamp", kind="stable")
    items = pd.read_csv(paths["all_items"], dtype=str)
    new = items[~items["item_id"].isin(pd.read_csv(paths["early_items"], dtype=str)["item_id"])]
    with open_stream(url) as stream:
        assert all(stream.claim_items(new.to_dict("records")))
        events = [{"user_id": r.user_id, "item_id": r.item_id, "timestamp": float(r.timestamp)} for r in late.itertuples()]
        bad = [{k: (v.format(item=events[0]["item_id"]) if isinstance(v, str) else v) for k, v in b.items()} for b in BAD_EVENTS]
        records = events[:100] + bad + events[100:]
        offsets = stream.append_events(records)
    usable = pd.DataFrame([{**r, "offset": o} for r, o in zip(records, offsets) if r["user_id"] != "u-bad"])
    return usable, list(new["item_id"])


def learnt_parts(learn_dir: Path) -> pd.DataFrame:
    """The events the learner committed, from its Parquet parts up to state.pt's commit."""
    commits = torch.load(learn_dir / "state.pt", weights_only=False)["commits"]
    parts = [p for p in sorted((learn_dir / "events").glob("part-c*.parquet")) if int(p.stem.removeprefix("part-c")) <= commits]
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def assert_learnt_exactly_once(learn_dir: Path, usable: pd.DataFrame) -> None:
    parts = learnt_parts(learn_dir)
    assert parts["offset"].is_unique
    assert sorted(parts["offset"]) == sorted(usable["offset"])
    assert parts.groupby("user_id").size().to_dict() == usable.groupby("user_id").size().to_dict()
    # The order per user is the stream's.
    for user, rows in parts.groupby("user_id"):
        assert list(rows["item_id"]) == list(usable[usable["user_id"] == user]["item_id"])


def learn_args(trained, run: str, url: str, *extra: str) -> list[str]:
    folder, overrides, _ = trained
    return ["learn", "--checkpoint", str(folder / "run" / "checkpoints" / "best.ckpt"), *overrides,
            f"stream.url={url}", f"learn.dir={folder / run}", "learn.idle_exit_s=1", "stream.poll_interval_s=0.2", *extra]


@pytest.mark.parametrize("backend", ["dir", "redis"])
def test_learn_every_event_once_new_items_exported_bad_records_skipped(trained, backend, request):
    folder, _, paths = trained
    url = str(folder / "stream-a") if backend == "dir" else f"{request.getfixturevalue('redis_url')}?prefix=learn"
    run = f"learn-{backend}"
    usable, new_items = fill_stream(url, paths)
    result = twotower(*learn_args(trained, run, url, "learn.step_events=64"), "--export", str(folder / f"export-{backend}"), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["skipped"] == {"unknown_item": 1, "unknown_fields": 1, "malformed": 1}
    assert "no-such-item" in result.stderr and "'colour'" in result.stderr and "yesterday" in result.stderr
    assert_learnt_exactly_once(folder / run, usable)
    # Each usable event is one step's target unless it is a new user's first event.
    first_events = (~usable["user_id"].isin(pd.read_csv(paths["early"], dtype={"user_id": str})["user_id"])).groupby(usable["user_id"]).any().sum()
    assert printed["learnt"]["events"] == len(usable)
    assert printed["learnt"]["targets"] == len(usable) - first_events
    assert printed["items_added"] == len(new_items) > 0
    exported = json.loads((folder / f"export-{backend}" / "export.json").read_text())
    assert exported["stream"]["offsets"]["events"] == usable["offset"].iloc[-1]  # the last record is a usable event
    item_ids = json.loads((folder / f"export-{backend}" / "item_ids.json").read_text())
    assert set(new_items) <= set(item_ids)
    learnt_items = pd.concat([pd.read_parquet(p) for p in (folder / run / "items").glob("*.parquet")])
    assert sorted(learnt_items["item_id"]) == sorted(new_items)
    if backend == "redis":
        return

    # What the learner consumed, appended to (a copy of) the prepared data, gives exactly the stream's events.
    shutil.copytree(folder / "data", folder / "data-a")
    cfg = load_config([], trained[1] + [f"data.dir={folder / 'data-a'}", "data.source=table",
                                        f"data.interactions={folder / run / 'events'}", f"data.items={paths['all_items']}"])
    prepare_append(cfg)
    manifest = json.loads((folder / "data-a" / "manifest.json").read_text())
    appended = pd.read_parquet(folder / "data-a" / event_tables(manifest)[-1])
    assert appended.groupby("user_id").size().to_dict() == usable.groupby("user_id").size().to_dict()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_learns_each_event_once_and_ends_where_an_uninterrupted_run_does(trained):
    folder, _, paths = trained
    url = str(folder / "stream-k")
    usable, _ = fill_stream(url, paths)
    extra = ("learn.step_events=32", "learn.commit_every_steps=3", "trainer.num_threads=1")
    clean = twotower(*learn_args(trained, "learn-clean", url, *extra), cwd=folder, threads=1)
    assert clean.returncode == 0, clean.stderr[-3000:]

    rng = random.Random(0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    kills = 0
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "twotower", *learn_args(trained, "learn-k", url, *extra)],
                                cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        state = folder / "learn-k" / "state.pt"
        committed = state.stat().st_mtime_ns if state.exists() else None
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 120 and (
                not state.exists() or state.stat().st_mtime_ns == committed):
            time.sleep(0.05)  # kill only once this process has committed (start-up has nothing to lose)
        time.sleep(rng.uniform(0.0, 2.0))
        if proc.poll() is not None:
            _, err = proc.communicate()
            assert proc.returncode == 0, err[-3000:]
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += 1
    else:
        pytest.fail("the learner never finished")
    assert kills >= 1
    assert_learnt_exactly_once(folder / "learn-k", usable)
    resumed = torch.load(folder / "learn-k" / "state.pt", weights_only=False)
    reference = torch.load(folder / "learn-clean" / "state.pt", weights_only=False)
    assert resumed["step"] == reference["step"] and resumed["learnt"] == reference["learnt"]
    for key, value in reference["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_gloo_processes_split_the_stream_by_user_and_none_hangs(trained):
    folder, _, paths = trained
    url = str(folder / "stream-d")
    usable, new_items = fill_stream(url, paths)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29_500 + os.getpid() % 500)}
    # One event per step: every step one rank has nothing of its own and must still take part.
    args = learn_args(trained, "learn-d", url, "learn.step_events=1", "learn.max_steps=40", "learn.export_every_steps=20",
                      "trainer.num_threads=1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             env["MASTER_PORT"], "-m", "twotower", *args, "--export", str(folder / "export-d")],
                            cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    parts = learnt_parts(folder / "learn-d")
    assert list(parts["offset"]) == list(usable["offset"][:40])
    assert set(new_items) <= set(json.loads((folder / "export-d" / "item_ids.json").read_text()))


def test_a_non_finite_step_is_dropped_and_leaves_the_weights_as_they_were(trained):
    from twotower.trainers.learn import Learner

    folder, overrides, paths = trained
    url = str(folder / "stream-nan")
    fill_stream(url, paths)
    cfg = load_config([], [*overrides, f"stream.url={url}", f"learn.dir={folder / 'learn-nan'}", "learn.step_events=64"])
    learner = Learner(cfg, str(folder / "run" / "checkpoints" / "best.ckpt"))
    params = [p for p in learner.module.parameters() if p.requires_grad]
    learner.module.loss = lambda *batch: sum(p.sum() for p in params) * float("nan")
    before = {k: v.clone() for k, v in learner.module.state_dict().items()}
    assert learner.learn_available() > 0
    assert learner.learnt["skipped_steps"] == learner.step > 0
    for key, value in learner.module.state_dict().items():
        if key in before and value.shape == before[key].shape:  # ID rows of new items were appended
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("wait_s", [0.0, 5.0])
def test_a_step_waits_up_to_step_wait_s_for_a_full_step(trained, wait_s):
    from twotower.trainers.learn import Learner

    folder, overrides, paths = trained
    url = str(folder / f"stream-wait-{wait_s}")
    usable, _ = fill_stream(url, paths)
    events = usable.drop(columns="offset").to_dict("records")[:20]
    url_live = str(folder / f"stream-live-{wait_s}")
    cfg = load_config([], [*overrides, f"stream.url={url_live}", f"learn.dir={folder / f'learn-wait-{wait_s}'}",
                           "learn.step_events=20", f"learn.step_wait_s={wait_s}", "stream.poll_interval_s=0.05"])
    learner = Learner(cfg, str(folder / "run" / "checkpoints" / "best.ckpt"))
    with open_stream(url_live) as stream:
        stream.append_events(events[:8])
        late = threading.Timer(0.5, stream.append_events, [events[8:]])
        late.start()
        fetched, _ = learner._fetch()
        late.join()
    assert len(fetched) == (20 if wait_s else 8)


def test_history_len_and_replay_len_crop_the_learners_sequences(trained):
    """A step's new events of a user train in one sequence ending at the newest, the first of them
    predicted from at most learn.history_len items (data.max_len + 1 items in all); a replayed
    sequence is a window of at most learn.replay_len + 1 items, every position a target."""
    from twotower.trainers.learn import Learner

    folder, overrides, paths = trained
    url = str(folder / "stream-history")
    fill_stream(url, paths)
    cfg = load_config([], [*overrides, f"stream.url={url}", f"learn.dir={folder / 'learn-history'}",
                           "learn.history_len=3", "learn.replay_len=4", "learn.replay_fraction=0.5", "learn.step_events=200"])
    learner = Learner(cfg, str(folder / "run" / "checkpoints" / "best.ckpt"))
    events_records, item_records = learner._fetch()
    learner._take_items(item_records)
    max_len = cfg.data.max_len
    events, new = [], {}
    for e in learner._take_events(events_records):
        if new.get(e.user_id, 0) < max_len:  # at most max_len new events per user: one sequence each
            new[e.user_id] = new.get(e.user_id, 0) + 1
            events.append(e)
    before = {e.user_id: learner.histories.length(e.user_id) for e in events}
    sequences, targets, replayed = learner._sequences(events, np.random.default_rng(0))
    users = [u for u in dict.fromkeys(e.user_id for e in events) if before[u] + new[u] > 1]
    assert len(sequences) == 2 * len(users)  # replay 0.5: as many replayed sequences as new ones
    replays = sequences[len(users):]
    assert all(2 <= len(items) <= 5 and left_out == 0 for items, _, _, left_out in replays)
    assert replayed == sum(len(items) - 1 for items, _, _, _ in replays)
    for user, (items, _, _, left_out) in zip(users, sequences):
        whole = learner.histories.sequence(user, before[user] + new[user], before[user] + new[user], 0)[0]
        cases = min(new[user], before[user] + new[user] - 1)  # a new user's first event is history only
        history = min(3, before[user] + new[user] - cases)  # items before the first new target
        assert len(items) == min(max_len, cases - 1 + history) + 1
        assert list(items) == list(whole[-len(items):])
        assert left_out == len(items) - 1 - min(cases, max_len)
    assert targets == sum(min(new[u], before[u] + new[u] - 1) for u in users)


def test_the_stale_table_is_committed_with_the_weights_and_restored_on_resume(trained):
    """With the full softmax over a stale table (`model.loss.refresh_every`), state.pt keeps the
    table and its age: a learner restarted from the commit reads the table the running one reads,
    not one re-encoded from the weights trained since."""
    from dataclasses import replace

    from twotower.trainers.learn import Learner

    folder, overrides, paths = trained
    url = str(folder / "stream-stale")
    fill_stream(url, paths)
    cfg = load_config([], [*overrides, f"stream.url={url}", f"learn.dir={folder / 'learn-stale'}", "learn.step_events=64"])

    def stale_learner() -> Learner:
        learner = Learner(cfg, str(folder / "run" / "checkpoints" / "best.ckpt"))
        model = learner.module.cfg.model
        loss = replace(model.loss, candidates="full", refresh_every=1000)
        learner.module.cfg = replace(learner.module.cfg, model=replace(model, loss=loss))
        assert learner.module.refreshes
        return learner

    running = stale_learner()
    assert running.step_once()[0] > 0 and running.step_once()[0] > 0
    running.commit()
    table, age = running.module._stale.clone(), running.module._stale_age
    assert age == 2
    restarted = stale_learner()
    assert restarted.step == running.step and restarted.module._stale_age == age
    torch.testing.assert_close(restarted.module._stale, table, atol=0, rtol=0)
    with torch.no_grad():
        re_encoded = restarted.module.model.catalogue_pooled(64)
    assert not torch.allclose(re_encoded, table, atol=1e-5, rtol=1e-5)  # the weights moved since the table was encoded
