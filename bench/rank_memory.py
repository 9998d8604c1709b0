"""Per-rank memory (PSS) of a multi-rank CPU run against catalogue size, before and after the item
catalogue is shared once per machine and its encoding split across ranks (issue 20, item 5).

    python bench/rank_memory.py                        # 100k and 1M items, 2 ranks (prepares under --workdir once)
    python bench/rank_memory.py --quick                # a smoke run: 1,000 and 3,000 items
    python bench/rank_memory.py --workdir /tmp/rm      # keep and reuse the prepared data and the tiny BERT

Each row runs `--world` gloo ranks (separate processes, 1 thread each) through the same steps on
the same prepared synthetic data (`data.synthetic.num_items` items, 1,000 users; --quick 200): the data module
(which loads the catalogue), the model (a tiny random 2-layer BERT item tower, every layer
trained, so no frozen-layer cache), `set_catalogue`, then one validation: the catalogue table
(`catalogue_table`) and the ranking of the rank's share of `--users` validation users.

* before: the code of the commit before the change (`--before`, default the parent of the commit
  that added datamodules/catalogue.py; HEAD while that is uncommitted), unpacked with `git archive`
  into a temporary folder and imported in place of this tree: every rank reads the item shards into
  a dense int64 [N, T] tensor and Python lists of ids and texts, and encodes every item.
* after: this tree, on the catalogue cache (`data.cache_dir`) that this script built just before
  (the build's seconds are printed): every rank maps the same .npy files and encodes 1/W of the items.

Each rank reads its own PSS (/proc/self/smaps_rollup: a page shared by k processes counts 1/k in
each) after setup and at the end; a thread samples it every 20 ms for the peak. The table shows
the mean over ranks; the predicted drop under it is the arithmetic of what each rank no longer
holds (see `predicted`)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # last: a `before` run's PYTHONPATH must win for `twotower`

from bench.process_memory import pss_mb  # noqa: E402

EVENTS, TEXT_LEN = 10, 32


def model_overrides(bert: str, folder: Path) -> list[str]:
    """What every rank runs: the tiny BERT, every layer trained (no frozen-layer cache), on `folder`."""
    return [f"model.item.encoder={bert}", "model.item.train_layers=-1", f"data.dir={folder}", f"data.max_text_len={TEXT_LEN}"]


def data_overrides(bert: str, folder: Path, items: int, users: int) -> list[str]:
    """The synthetic set of `items` items and `users` users (prepared once per --workdir)."""
    return model_overrides(bert, folder) + [f"data.synthetic.num_items={items}", f"data.synthetic.num_users={users}",
                                             f"data.synthetic.mean_events={EVENTS}"]


# ---- one rank ---------------------------------------------------------------------------------
class PeakPss:
    """This process's highest PSS, sampled every `interval` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.02):
        self.peak, self.interval = pss_mb(), interval
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, pss_mb())
            time.sleep(self.interval)


def worker(args: argparse.Namespace) -> None:
    """One rank: setup, one validation, its PSS written to `args.out` as JSON."""
    peak = PeakPss()
    import torch
    import torch.distributed as dist

    from twotower.configs import load_config
    from twotower.datamodules.datamodule import ShardDataModule
    from twotower.modules.lit_two_tower import TwoTowerModule

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world)
    overrides = model_overrides(args.bert, Path(args.data)) + ([f"data.cache_dir={args.cache}"] if args.cache else [])
    cfg = load_config([], overrides)
    started = time.perf_counter()
    data = ShardDataModule(cfg)
    module = TwoTowerModule(cfg, data.num_items, data.catalogue.train_counts, data.catalogue.cold, len(data.actions))
    module.model.item_tower.set_catalogue(data.catalogue.tokens, data.catalogue.lengths)
    module.eval()
    gc.collect()
    setup_s, setup = time.perf_counter() - started, pss_mb()
    dist.barrier()
    started = time.perf_counter()
    with torch.no_grad():
        if args.read_only:
            ranked = read_share(module.model)
        else:
            table = module.catalogue_table()
            ranked = sum(len(module.target_ranks(history, target, table)) for history, target in
                         data.eval_dataloader("valid", args.users, args.rank, args.world))
    end, validate_s = pss_mb(), time.perf_counter() - started
    dist.barrier()
    Path(args.out).write_text(json.dumps({"setup": setup, "end": end, "peak": max(peak.peak, end), "setup_s": setup_s,
                                          "validate_s": validate_s, "users": ranked, "items": data.num_items,
                                          "width": int(data.catalogue.tokens.shape[1])}))
    dist.destroy_process_group()


def read_share(model) -> int:
    """--read-only: read, chunk by chunk, the token rows this rank would encode (all of them
    before the change, whose model has no `catalogue_share`), without encoding them: what the
    encoding does to the catalogue's pages, in seconds instead of minutes at 1M items."""
    import torch

    tower = model.item_tower
    mine = model.catalogue_share(torch.device("cpu"))[0] if hasattr(model, "catalogue_share") else tower.lengths.argsort()
    return sum(int(tower.tokens[chunk].sum() >= 0) for chunk in mine.split(4096))


# ---- the driver -------------------------------------------------------------------------------
def before_ref(requested: str | None) -> str:
    """The commit whose code `before` runs."""
    if requested:
        return requested
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "datamodules/catalogue.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return f"{added[-1]}^" if added else "HEAD"


def source_tree(ref: str, where: Path) -> Path:
    """The package of commit `ref` as an import root: `git archive` of it, and a `twotower/` folder
    that maps its top-level folders as setup.cfg's package_dir does (linked, not copied)."""
    src = where / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    package = where / "root" / "twotower"
    package.mkdir(parents=True)
    for entry in (src / "twotower").iterdir():
        (package / entry.name).symlink_to(entry)
    for folder in ("configs", "modules", "datamodules", "trainers", "serving"):
        (package / folder).symlink_to(src / folder)
    return where / "root"


def run_ranks(args: argparse.Namespace, items: int, data: Path, bert: str, root: Path | None, cache: Path | None, out: Path) -> list[dict]:
    """`args.world` worker processes; `root`: the import root of the `before` code (None: this tree)."""
    from helpers import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if root is not None:
        env["PYTHONPATH"] = str(root)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r), "--world", str(args.world),
                               "--port", str(port), "--data", str(data), "--bert", bert, "--items", str(items),
                               "--users", str(args.users), "--out", str(out / f"rank{r}.json")]
                              + (["--read-only"] if args.read_only else [])
                              + (["--cache", str(cache)] if cache else []),
                              env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(args.world)]
    logs = [p.communicate(timeout=3600)[0] for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode:
            raise SystemExit(f"a rank failed (exit {p.returncode}):\n{log[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.world)]


def predicted(data: Path, cache: Path, items: int, world: int) -> tuple[float, str]:
    """MB per rank that sharing saves, and its arithmetic. Before, each rank holds the dense int64
    tokens (N x T x 8 bytes), lengths and train counts (N x 8 each), cold flags (N) and the Python
    lists of ids and texts (each string object plus an 8-byte list slot, measured with
    sys.getsizeof). After, the W ranks map one copy of the int32 tokens (N x T x 4), lengths,
    counts and flags (N x 17), every page of which validation touches, so PSS counts 1/W of it per
    rank; the mapped ids and texts are not read, so not resident."""
    from twotower.datamodules.catalogue import load_catalogue

    catalogue = load_catalogue(data, json.loads((data / "manifest.json").read_text()), cache)
    n, width = len(catalogue), int(catalogue.tokens.shape[1])
    strings = sum(sys.getsizeof(s) + 8 for column in (catalogue.item_ids, catalogue.texts) for s in column)
    before = n * width * 8 + n * 17 + strings
    after = (n * width * 4 + n * 17) / world
    text = (f"{n} items, T={width}: before {n}x{width}x8 + {n}x17 + {strings / 2**20:.0f} MB of id and text strings = "
            f"{before / 2**20:.0f} MB per rank; after ({n}x{width}x4 + {n}x17) / {world} = {after / 2**20:.0f} MB per rank; "
            f"drop {(before - after) / 2**20:.0f} MB")
    return (before - after) / 2**20, text


def prepare_data(items: int, users: int, workdir: Path, bert: str) -> Path:
    from twotower.configs import load_config
    from twotower.datamodules.prepare import prepare

    folder = workdir / f"data-{items}"
    prepare(load_config([], data_overrides(bert, folder, items, users)))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 and 3,000 items, 200 users: a smoke run")
    parser.add_argument("--sizes", default="100000,1000000", help="catalogue sizes, comma-separated (default: %(default)s)")
    parser.add_argument("--world", type=int, default=2, help="ranks (default: %(default)s)")
    parser.add_argument("--users", type=int, default=200, help="validation users ranked, over all ranks (default: %(default)s)")
    parser.add_argument("--workdir", help="where the prepared data and the tiny BERT are kept and reused (default: a temporary folder)")
    parser.add_argument("--read-only", action="store_true", help="instead of a validation, read the token rows each rank "
                        "would encode, without encoding them (the catalogue's pages as validation touches them, in seconds)")
    parser.add_argument("--before", help="the commit whose code the before rows run (default: see the module docstring)")
    for name in ("--rank", "--port", "--items"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    for name in ("--data", "--bert", "--out", "--cache"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import save_tiny_bert

    sizes = [1000, 3000] if args.quick else [int(s) for s in args.sizes.split(",")]
    data_users = 200 if args.quick else 1000
    if args.quick:
        args.users = 40
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        workdir = Path(args.workdir) if args.workdir else scratch / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        bert = save_tiny_bert(workdir / "tiny-bert")
        ref = before_ref(args.before)
        commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        root = source_tree(ref, scratch / "before")
        print(f"# bench/rank_memory.py  {platform.processor() or platform.machine()}, {args.world} gloo ranks x 1 thread; "
              f"before = {commit} ({ref}), after = this tree; tiny BERT (2 layers, 32 wide, all trained), "
              f"data.max_text_len={TEXT_LEN}, {data_users} users, "
              + ("each rank reads the token rows it would encode (--read-only)" if args.read_only else f"{args.users} validation users ranked"))
        print("\n| items | ranks | run | PSS after setup MB | PSS at end MB | peak PSS MB | setup s | validate s |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|")
        notes = []
        for items in sizes:
            data = prepare_data(items, data_users, workdir, bert)
            cache = scratch / f"cache-{items}"
            started = time.perf_counter()
            drop, arithmetic = predicted(data, cache, items, args.world)  # builds the cache
            built_s = time.perf_counter() - started
            rows = {}
            for run, tree, cache_dir in (("before", root, None), ("after", None, cache)):
                out = scratch / f"{run}-{items}"
                out.mkdir()
                ranks = run_ranks(args, items, data, bert, tree, cache_dir, out)
                rows[run] = {k: sum(r[k] for r in ranks) / len(ranks) for k in ("setup", "end", "peak", "setup_s", "validate_s")}
                r = rows[run]
                print(f"| {items} | {args.world} | {run} | {r['setup']:.0f} | {r['end']:.0f} | {r['peak']:.0f} | "
                      f"{r['setup_s']:.1f} | {r['validate_s']:.1f} |", flush=True)
            before, after = rows["before"], rows["after"]
            notes.append(f"* {items} items: per-rank PSS at end {before['end']:.0f} -> {after['end']:.0f} MB "
                         f"(after / before {after['end'] / before['end']:.2f}x), measured drop {before['end'] - after['end']:.0f} MB "
                         f"(after setup {before['setup'] - after['setup']:.0f} MB), predicted drop {drop:.0f} MB; peak "
                         f"{before['peak']:.0f} -> {after['peak']:.0f} MB ({after['peak'] / before['peak']:.2f}x); the cache built in {built_s:.0f} s"
                         f"\n  predicted: {arithmetic}")
            shutil.rmtree(cache, ignore_errors=True)
        print("\nper-rank PSS, before vs after (mean over ranks):")
        print("\n".join(notes))


if __name__ == "__main__":
    main()
