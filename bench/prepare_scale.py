"""`twotower prepare` at growing sizes: the pandas path (one process) against the Ray engine
(`data.engine=ray`, a map-reduce), on synthetic interactions in a partitioned Parquet folder, each
run a `python -m twotower prepare` subprocess in a memory cgroup of its own. Two tables:

(a) per size x engine: events, items, wall s, peak memory, events/s, and the engine's wall time
    against pandas' on the same data in the same run (`ray / pandas`);
(b) the memory ceiling: under one cgroup memory limit (`--cap` GiB), the largest event count each
    engine completes, found by doubling from `--ceiling-start` (the engine: from 4x pandas' ceiling,
    the size it must reach) and then bisecting, and their ratio.

    python bench/prepare_scale.py                                   # 1M, 10M events (100k items) + the 6 GiB ceiling
    python bench/prepare_scale.py --sizes 1M:100k,10M:100k,30M:1M --no-ceiling
    python bench/prepare_scale.py --no-table --cap 4 --ceiling-start 2M
    python bench/prepare_scale.py --quick                           # a smoke run: 20k events, 2k items

Data: users with 20-50 events each (string ids), items from a catalogue of `items` (string ids, a
short title drawn from a small vocabulary), event times increasing per user; written ~1M rows per
Parquet file chunk by chunk (never all in memory), and cached per size under the working folder so
that the ceiling's bisection reuses it. The item tower's encoder is a tiny random BERT with the
packaged MiniLM's real WordPiece tokenizer (`tests/helpers.save_tiny_bert`): tokenising is real,
loading the model is not what is measured.

Memory: the cgroup's peak (cgroup v1 `memory.max_usage_in_bytes`, v2 `memory.peak`) counts the
whole process tree (Ray's raylet, workers and object store in /dev/shm included) but also the page
cache of the files written and read, which the kernel drops under a limit rather than failing; so
the table also gives the peak of the tree's proportional set size (PSS, shared pages counted once,
sampled every 0.2 s), which is what a limit cannot reclaim. A run that the cgroup's OOM killer hits
and that does not finish with its manifest did not complete. Ray's object store is sized to 30 % of
the cap (RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION; Ray does not see a nested cgroup's limit) and
spills to disk beyond it. Where no memory cgroup can be made (not root, no cgroup filesystem) the
runs are unconfined, peaks come from the sampling alone, and the ceiling is skipped with a note.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from tests.helpers import save_tiny_bert  # noqa: E402
from twotower.tables import markdown_table  # noqa: E402

from bench.process_memory import pss_mb  # noqa: E402

GIB = 1024 ** 3
ROWS_PER_FILE = 1_000_000
WORDS = np.array(["red", "blue", "green", "small", "large", "classic", "modern", "wooden", "steel", "cotton", "leather", "travel",
                  "kitchen", "garden", "office", "winter", "summer", "sport", "home", "light", "dark", "soft", "hard", "mini",
                  "pro", "ultra", "vintage", "smart", "eco"])


# ---------------------------------------------------------------------------------------- data


def parse_count(text: str) -> int:
    """'20k', '1M', '1.5M', '30000' -> an int (the sizes are easier to read that way)."""
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def show_count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k" if n >= 1000 else str(n)


def write_items(path: Path, num_items: int, seed: int) -> None:
    """items.parquet: item_id (str) and a 3-6 word title (so tokenising does some work per item)."""
    rng = np.random.default_rng(seed)
    words = WORDS[rng.integers(len(WORDS), size=(num_items, 6))]
    lengths = rng.integers(3, 7, size=num_items)
    titles = [" ".join(row[:n]) + f" {i}" for i, (row, n) in enumerate(zip(words, lengths))]
    ids = [f"i{i:07d}" for i in range(num_items)]
    pq.write_table(pa.table({"item_id": ids, "title": titles}), path)


def interaction_chunk(rng: np.random.Generator, first_user: int, rows: int, num_items: int) -> tuple[pa.Table, int]:
    """~`rows` events of consecutive users (20-50 each, increasing times); returns the table and
    the next user number. Item popularity is skewed (a squared uniform), as real catalogues are."""
    lengths = rng.integers(20, 51, size=rows // 20 + 1)  # enough users for `rows`, cut below
    lengths = lengths[: max(1, int(np.searchsorted(np.cumsum(lengths), rows)) + 1)]
    n = int(lengths.sum())
    user = np.repeat(np.arange(first_user, first_user + len(lengths)), lengths)
    items = (rng.random(n) ** 2 * num_items).astype(np.int64)
    gaps = rng.integers(1, 86_400, size=n)
    first = np.cumsum(lengths) - lengths
    cumulative = np.cumsum(gaps)
    times = 1_600_000_000 + cumulative - np.repeat(cumulative[first] - gaps[first], lengths)  # each user from ~2020 on
    table = pa.table({"user_id": pa.array(np.char.add("u", user.astype("U10")).astype(object)),
                      "item_id": pa.array(np.char.add("i", np.char.zfill(items.astype("U7"), 7)).astype(object)),
                      "timestamp": times.astype(np.int64)})
    return table, first_user + len(lengths)


def dataset(work: Path, events: int, num_items: int, seed: int = 0) -> tuple[Path, Path, int]:
    """(interactions folder, items file, exact event count) for this size, generated once (cached)."""
    folder = work / "data" / f"e{events}_i{num_items}"
    done = folder / "_DONE"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "interactions").mkdir(parents=True)
        write_items(folder / "items.parquet", num_items, seed)
        rng, user, written, part = np.random.default_rng(seed + 1), 0, 0, 0
        while written < events:
            table, user = interaction_chunk(rng, user, min(ROWS_PER_FILE, events - written), num_items)
            pq.write_table(table, folder / "interactions" / f"part-{part:05d}.parquet")
            written, part = written + table.num_rows, part + 1
        done.write_text(str(written))
    return folder / "interactions", folder / "items.parquet", int(done.read_text())


# ---------------------------------------------------------------------------------------- cgroup


class Cgroup:
    """A memory cgroup for one run, nested in this process's own (so every limit above still
    holds): v2 (`memory.max`, `memory.peak`, `memory.events`) or v1 (`memory.limit_in_bytes`,
    `memory.max_usage_in_bytes`, `memory.oom_control`)."""

    def __init__(self, path: Path, v2: bool):
        self.path, self.v2 = path, v2

    @classmethod
    def create(cls, name: str, cap_bytes: int | None) -> Cgroup | None:
        for v2, root in ((True, Path("/sys/fs/cgroup")), (False, Path("/sys/fs/cgroup/memory"))):
            own = _own_cgroup(v2)
            if own is None or not (root / "cgroup.procs").exists():
                continue
            base = root / own.lstrip("/")
            try:
                if v2 and "memory" not in (base / "cgroup.subtree_control").read_text().split():
                    continue  # enabling it would need this process out of `base` (no internal processes)
                path = base / name
                path.mkdir(exist_ok=True)
                group = cls(path, v2)
                group.limit(cap_bytes)
                return group
            except OSError:
                continue
        return None

    def limit(self, cap_bytes: int | None) -> None:
        if self.v2:
            (self.path / "memory.max").write_text(str(cap_bytes) if cap_bytes else "max")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(cap_bytes) if cap_bytes else "-1")

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        return next((int(line.split()[1]) for line in text.splitlines() if line.startswith("oom_kill ")), 0)

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        """Ends what the run left in the group (Ray's daemons, should a crash orphan them), then the group."""
        for _ in range(50):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.path.rmdir()
        except OSError:
            pass


def _own_cgroup(v2: bool) -> str | None:
    """This process's cgroup path in the v2 hierarchy, or in v1's memory controller."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if (v2 and number == "0" and controllers == "") or (not v2 and "memory" in controllers.split(",")):
            return path
    return None


# ---------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    engine: str
    events: int
    items: int
    ok: bool
    wall: float
    peak_cgroup: float
    peak_pss: float
    oom_kills: int
    note: str = ""


class TreeSampler(threading.Thread):
    """The peak PSS of a process and its descendants, sampled (psutil), in GiB."""

    def __init__(self, pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0.0, threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
                self.peak = max(self.peak, sum(pss_mb(p.pid) for p in tree) / 1024)
            except psutil.Error:
                pass
            self.stop.wait(self.every)


def prepare_command(engine: str, interactions: Path, items: Path, out: Path, encoder: str) -> list[str]:
    """The command a user would type: a fresh prepare (`--force`) of a table source."""
    command = [sys.executable, "-m", "twotower", "prepare", "--force", "data.source=table", f"data.interactions={interactions}",
               f"data.items={items}", f"data.dir={out}", f"data.engine={engine}", f"model.item.encoder={encoder}",
               "data.text_fields=[title]", "data.shard_max_count=10000", "logger.wandb.mode=disabled"]
    return command


DONE: dict[tuple, Run] = {}
"Runs made so far, by (engine, events, items, cap): the ceiling reuses a size-table run under the same cap."


def run_prepare(engine: str, interactions: Path, items: Path, events: int, num_items: int, work: Path, encoder: str,
                cap_gib: float | None, timeout: float) -> Run:
    """One `twotower prepare` subprocess (once per engine, size and cap), in its own memory cgroup
    when one can be made (capped at `cap_gib`); its wall time, peaks and whether it completed (exit
    0 and a manifest)."""
    key = (engine, events, num_items, cap_gib)
    if key not in DONE:
        DONE[key] = _run_prepare(engine, interactions, items, events, num_items, work, encoder, cap_gib, timeout)
    return DONE[key]


def _run_prepare(engine: str, interactions: Path, items: Path, events: int, num_items: int, work: Path, encoder: str,
                 cap_gib: float | None, timeout: float) -> Run:
    out = work / "out" / f"{engine}-{events}"
    shutil.rmtree(out, ignore_errors=True)
    cap = int(cap_gib * GIB) if cap_gib else None
    group = Cgroup.create(f"prepare-scale-{os.getpid()}-{engine}", cap)
    command = prepare_command(engine, interactions, items, out, encoder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true", "RAY_USAGE_STATS_ENABLED": "0"}
    if engine == "ray":
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        env["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] = f"{min(0.3, 0.3 * cap / total) if cap else 0.3:.4f}"
    if group is not None:  # the shell joins the group, then becomes the prepare: every descendant is in it
        command = ["sh", "-c", f'echo $$ > "{group.path}/cgroup.procs" && exec "$@"', "sh", *command]
    log = work / "logs" / f"{engine}-{events}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        sampler = TreeSampler(process.pid)
        sampler.start()
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            rc = process.wait()
        wall = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
    kills = group.oom_kills() if group else 0
    peak = group.peak() / GIB if group else 0.0
    if group:
        group.remove()
    ok = rc == 0 and (out / "manifest.json").is_file()
    note = "" if ok else f"rc {rc}" + (f", {kills} OOM kill(s)" if kills else "") + f" (log: {log})"
    if ok:
        shutil.rmtree(out, ignore_errors=True)
    return Run(engine, events, num_items, ok, wall, peak, sampler.peak, kills, note)


# ---------------------------------------------------------------------------------------- tables


def size_table(runs: list[Run], have_cgroup: bool) -> str:
    rows = []
    for r in runs:
        pandas = next((p for p in runs if p.engine == "pandas" and p.events == r.events and p.items == r.items and p.ok), None)
        rows.append({"engine": r.engine, "events": f"{r.events:,}", "items": f"{r.items:,}", "ok": "yes" if r.ok else f"no: {r.note}",
                     "wall": f"{r.wall:.1f}", "cg": f"{r.peak_cgroup:.2f}" if have_cgroup else "–", "pss": f"{r.peak_pss:.2f}",
                     "eps": f"{r.events / r.wall:,.0f}" if r.ok else "–",
                     "ratio": f"{r.wall / pandas.wall:.2f}" if (pandas and r.ok and r.engine == "ray") else "–"})
    return markdown_table(rows, ["engine", "events", "items", "ok", "wall", "cg", "pss", "eps", "ratio"],
                          ["engine", "events", "items", "completed", "wall s", "cgroup peak GiB", "tree PSS peak GiB", "events/s",
                           "wall ray / pandas"])


def ceiling(engine: str, args, work: Path, encoder: str, tried: list[Run], start: int) -> tuple[int, int | None]:
    """(largest size completed, smallest size failed or None): doubling from `start` up to
    --ceiling-max, then --bisect steps between the last success and the first failure."""
    def attempt(events: int) -> bool:
        interactions, items, exact = dataset(work, events, args.ceiling_items)
        run = run_prepare(engine, interactions, items, exact, args.ceiling_items, work, encoder, args.cap, args.timeout)
        tried.append(run)
        print(f"  [ceiling {engine}] {exact:,} events: {'ok' if run.ok else 'FAILED ' + run.note} in {run.wall:.0f}s, "
              f"cgroup peak {run.peak_cgroup:.2f} GiB, PSS peak {run.peak_pss:.2f} GiB", flush=True)
        return run.ok

    good, bad, size = 0, None, start
    while size <= args.ceiling_max:
        if not attempt(size):
            bad = size
            break
        good, size = size, size * 2
    for _ in range(args.bisect if bad else 0):
        middle = (good + bad) // 2 // args.ceiling_grain * args.ceiling_grain
        if middle <= good or middle >= bad:
            break
        good, bad = (middle, bad) if attempt(middle) else (good, middle)
    return good, bad


def ceiling_table(results: dict[str, tuple[int, int | None]], cap: float, limit: int) -> str:
    pandas = results["pandas"][0]
    rows = [{"engine": engine, "cap": f"{cap:g}", "good": f"{good:,}" if good else "none",
             "bad": f"{bad:,}" if bad else f"none (the next doubling is past --ceiling-max {limit:,})",
             "ratio": (f"{good / pandas:.2f}" + ("+" if bad is None else "")) if pandas else "–"}
            for engine, (good, bad) in results.items()]
    return markdown_table(rows, ["engine", "cap", "good", "bad", "ratio"],
                          ["engine", "cap GiB", "largest completed (events)", "smallest failed", "x pandas"])


# ---------------------------------------------------------------------------------------- main


def describe_machine(args, encoder: str, have_cgroup: bool) -> None:
    import pandas
    import ray
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    print(f"bench/prepare_scale.py: {cpu}; {os.cpu_count()} cores, {memory:.1f} GiB RAM; python {platform.python_version()}, "
          f"pandas {pandas.__version__}, pyarrow {pa.__version__}, ray {ray.__version__}, transformers {transformers.__version__}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"encoder: tiny random BERT with MiniLM's tokenizer ({encoder}); data.shard_max_count=10000, data.text_fields=[title]; "
          f"ray: data.engine_partitions default (one per 500k events, at least 2 x CPUs), object store 30 % of the cap")
    print("memory cgroup: " + ("yes (a child of this process's own)" if have_cgroup else "NONE (not root or no cgroup filesystem): "
                               "peaks are sampled PSS only and the ceiling is skipped"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1M:100k,10M:100k", help="events:items pairs for the size table (default: %(default)s)")
    parser.add_argument("--engines", default="pandas,ray")
    parser.add_argument("--table-cap", type=float, default=None, help="GiB cap for the size table's runs (default: none)")
    parser.add_argument("--cap", type=float, default=6.0, help="the ceiling's cgroup memory limit in GiB (default: %(default)s)")
    parser.add_argument("--ceiling-start", default="2M", help="first size of the ceiling's doubling (default: %(default)s)")
    parser.add_argument("--ceiling-max", default="128M", help="largest size the ceiling tries (default: %(default)s)")
    parser.add_argument("--ceiling-items", default="100k", help="catalogue size of the ceiling's data (default: %(default)s)")
    parser.add_argument("--ceiling-grain", default="1M", help="bisection rounds sizes to this (default: %(default)s)")
    parser.add_argument("--bisect", type=int, default=2, help="bisection steps after the doubling (default: %(default)s)")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--no-ceiling", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per prepare before it counts as failed")
    parser.add_argument("--quick", action="store_true", help="20k events, 2k items, a generous cap: a smoke run")
    parser.add_argument("--out", help="working folder, data cache included (default: a new temporary one)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.cap, args.table_cap, args.ceiling_start, args.ceiling_max = "20k:2k", 4.0, 4.0, "20k", "20k"
        args.ceiling_items, args.ceiling_grain, args.bisect = "2k", "1k", 0  # the ceiling reuses the table's runs
    for name in ("ceiling_start", "ceiling_max", "ceiling_items", "ceiling_grain"):
        setattr(args, name, parse_count(getattr(args, name)))
    work = Path(args.out or tempfile.mkdtemp(prefix="prepare_scale_"))
    encoder = save_tiny_bert(work / "tiny-bert")
    probe = Cgroup.create(f"prepare-scale-{os.getpid()}-probe", None)
    if probe:
        probe.remove()
    engines = args.engines.split(",")
    describe_machine(args, encoder, probe is not None)
    print(f"working folder {work}\n")

    if not args.no_table:
        runs = []
        for spec in args.sizes.split(","):
            events, items = (parse_count(x) for x in spec.split(":"))
            interactions, items_file, exact = dataset(work, events, items)
            for engine in engines:
                run = run_prepare(engine, interactions, items_file, exact, items, work, encoder, args.table_cap, args.timeout)
                runs.append(run)
                print(f"  [{engine}] {exact:,} events, {items:,} items: {'ok' if run.ok else 'FAILED ' + run.note} in {run.wall:.1f}s",
                      flush=True)
        cap = f"cap {args.table_cap:g} GiB" if args.table_cap else "no cap"
        print(f"\n## prepare wall time and memory ({cap}; load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())})\n")
        print(size_table(runs, probe is not None))
        print()

    if not args.no_ceiling:
        if probe is None:
            print("## memory ceiling: skipped (no memory cgroup can be made here: it needs root and a cgroup filesystem)")
            return
        print(f"## memory ceiling under a {args.cap:g} GiB cgroup limit ({args.ceiling_items:,} items; doubling from "
              f"{args.ceiling_start:,} to at most {args.ceiling_max:,} events, then {args.bisect} bisection step(s))")
        tried: list[Run] = []
        results = {}
        for engine in engines:  # after pandas' ceiling, the others start at 4x it: the size they must reach
            start = max(args.ceiling_start, 4 * results["pandas"][0]) if engine != "pandas" and "pandas" in results else args.ceiling_start
            results[engine] = ceiling(engine, args, work, encoder, tried, min(start, args.ceiling_max))
        print()
        print(ceiling_table(results, args.cap, args.ceiling_max))
        print(f"\nload average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
