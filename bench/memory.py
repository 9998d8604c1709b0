"""Peak memory of training and of full-catalogue evaluation, against batch size and catalogue size,
in one process and one run (peak RSS reset between rows, see bench/process_memory.py).

    python bench/memory.py                      # the tables below, CPU
    python bench/memory.py --quick              # a smoke run: small catalogues

Table 1, training: one optimiser step (forward, backward, AdamW) of the `id` model (full softmax
where `model.loss.candidates=auto` picks it, sampled above `model.loss.full_max_logits`) and of the `text` model
(the shipped recipe: MiniLM, top layer trained from the frozen-layer cache), on random histories of
`data.max_len` items. Columns: batch, catalogue, candidates, peak RSS above the process's resting
RSS, of which the frozen cache (text; N x T x H x 4 bytes), and seconds per step.

Table 2, evaluation: ranking users' targets over the whole catalogue (`id` model, random weights,
histories of 50 filtered items), `eval.score_chunk_size` items at a time against the unchunked
path (one chunk = the whole catalogue). Both must give the same metric sums (checked); the table
shows peak RSS above resting and seconds per 1,000 users.

Table 3, the frozen-layer cache of the `text` model (MiniLM) with one trainable layer (token states,
N x T x H) and none (pooled vectors, N x H), in RAM or memory-mapped (`model.item.frozen_cache_dir`,
a fresh temporary folder, so the build is measured): the cache's size, the anonymous memory (RssAnon,
what only swap could free) above resting after build and one step, peak RSS (file pages included),
build seconds and step seconds.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from twotower.configs import load_config  # noqa: E402
from twotower.modules.histories import Histories  # noqa: E402
from twotower.modules.lit_two_tower import TwoTowerModule  # noqa: E402
from twotower.modules.metrics import metric_sums  # noqa: E402

from bench.process_memory import anonymous_rss_mb, peak_rss_mb, reset_peak_rss  # noqa: E402


def random_batch(batch: int, length: int, num_items: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-length histories (the worst case for memory) and their next-item targets."""
    seqs = torch.randint(0, num_items, (batch, length + 1), generator=generator)
    return seqs[:, :-1], seqs[:, 1:]


def train_row(mode: str, batch: int, num_items: int, max_len: int, text_len: int, overrides: tuple[str, ...] = ()) -> dict:
    cfg = load_config([], [f"model.mode={mode}", f"data.max_len={max_len}", f"data.max_text_len={text_len}", *overrides])
    generator = torch.Generator().manual_seed(0)
    module = TwoTowerModule(cfg, num_items, torch.ones(num_items), torch.zeros(num_items, dtype=torch.bool)).train()
    tower = module.model.item_tower
    if tower.uses_text:
        lengths = torch.randint(text_len // 4, text_len + 1, (num_items,), generator=generator)
        tokens = torch.randint(1000, 20000, (num_items, text_len), generator=generator)
        tower.set_catalogue(tokens * (torch.arange(text_len) < lengths[:, None]), lengths)
    module.log = lambda *args, **kwargs: None  # no Trainer attached
    optimizer = torch.optim.AdamW(module.parameters(), cfg.trainer.lr)
    inputs, targets = random_batch(batch, max_len, num_items, generator)
    reset_peak_rss()
    resting, resting_anon = peak_rss_mb(), anonymous_rss_mb()
    started = time.perf_counter()
    tower.build_frozen_cache(cfg.eval.item_batch_size)
    build_s = time.perf_counter() - started
    cache_mb = tower.frozen_cache.numel() * 4 / 2**20 if tower.frozen_cache is not None else 0.0
    started = time.perf_counter()
    module.training_step((Histories.of(inputs), targets), 0).backward()
    optimizer.step()
    seconds = time.perf_counter() - started
    return dict(mode=mode, batch=batch, items=num_items, candidates="full" if module.full_softmax else "sampled",
                peak_mb=peak_rss_mb() - resting, anon_mb=anonymous_rss_mb() - resting_anon, cache_mb=cache_mb,
                build_s=build_s, step_s=seconds)


def eval_row(num_items: int, users: int, chunk: int, batch: int) -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(1)
    items = torch.randn(num_items, 64, generator=generator)
    histories = torch.randint(0, num_items, (users, 50), generator=generator)
    targets = torch.randint(0, num_items, (users,), generator=generator)
    queries = torch.randn(users, 64, generator=generator)
    reset_peak_rss()
    resting = peak_rss_mb()
    started = time.perf_counter()
    sums: dict[str, float] = {}
    for start in range(0, users, batch):
        part = slice(start, start + batch)
        for name, value in metric_sums(queries[part], items, histories[part], targets[part], [10, 20], True, chunk).items():
            sums[name] = sums.get(name, 0.0) + float(value)
    seconds = time.perf_counter() - started
    return dict(items=num_items, chunk=chunk, peak_mb=peak_rss_mb() - resting, s_per_1k=1000 * seconds / users), sums


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small catalogues and batches: a smoke run")
    parser.add_argument("--chunk", type=int, default=65536, help="eval.score_chunk_size of the chunked rows (default: %(default)s)")
    parser.add_argument("--eval-batch", type=int, default=256, help="users per evaluation batch, data.eval_batch_size (default: %(default)s)")
    args = parser.parse_args()
    if args.quick:
        train_grid = [("id", 16, 1000), ("id", 64, 1000), ("text", 4, 200)]
        catalogues, users, max_len = [2000, 20000], 300, 20
        args.chunk = min(args.chunk, 1000)
        cache_items = 200
    else:
        train_grid = [("id", b, 10_000) for b in (32, 128, 512)] + [("id", 128, n) for n in (100_000, 1_000_000)] \
            + [("text", b, 2000) for b in (8, 32, 128)] + [("text", 32, n) for n in (500, 4000)]
        catalogues, users, max_len = [10_000, 100_000, 1_000_000], 2000, 50
        cache_items = 8000
    print(f"# bench/memory.py  {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; data.max_len={max_len}, data.max_text_len=32")
    print("\n## training: one step, peak RSS above resting")
    print(f"{'mode':<6}{'batch':>7}{'items':>10}{'candidates':>12}{'peak MB':>10}{'cache MB':>10}{'step s':>8}")
    for mode, batch, num_items in train_grid:
        r = train_row(mode, batch, num_items, max_len, 32)
        print(f"{r['mode']:<6}{r['batch']:>7}{r['items']:>10}{r['candidates']:>12}{r['peak_mb']:>10.0f}{r['cache_mb']:>10.0f}{r['step_s']:>8.2f}")
    print(f"\n## evaluation: {users} users, batches of {args.eval_batch}, histories of 50 filtered items, top-10/20 metrics")
    print(f"{'items':>10}{'chunk':>10}{'peak MB':>10}{'s/1k users':>12}{'peak vs unchunked':>19}")
    for num_items in catalogues:
        unchunked, reference = eval_row(num_items, users, num_items, args.eval_batch)
        chunked, sums = eval_row(num_items, users, min(args.chunk, num_items), args.eval_batch)
        if any(abs(sums[k] - reference[k]) > 1e-9 for k in reference):
            raise SystemExit(f"chunked and unchunked metrics differ at {num_items} items: {sums} vs {reference}")
        for r in (unchunked, chunked):
            ratio = f"{r['peak_mb'] / unchunked['peak_mb']:.2f}x" if unchunked["peak_mb"] >= 1 else "-"
            print(f"{r['items']:>10}{r['chunk']:>10}{r['peak_mb']:>10.0f}{r['s_per_1k']:>12.2f}{ratio:>19}")
    print(f"\n## frozen-layer cache: text, batch 8, {cache_items} items, in RAM or memory-mapped")
    print(f"{'train_layers':>12}{'cache':>8}{'cache MB':>10}{'anon MB':>9}{'peak MB':>9}{'build s':>9}{'step s':>8}")
    for train_layers in (1, 0):
        for storage in ("ram", "mmap"):
            with tempfile.TemporaryDirectory() as folder:
                where = f"model.item.frozen_cache_dir={folder}" if storage == "mmap" else "model.item.frozen_cache_dir=null"
                r = train_row("text", 8, cache_items, max_len, 32, (f"model.item.train_layers={train_layers}", where))
            print(f"{train_layers:>12}{storage:>8}{r['cache_mb']:>10.0f}{r['anon_mb']:>9.0f}{r['peak_mb']:>9.0f}{r['build_s']:>9.1f}{r['step_s']:>8.2f}")


if __name__ == "__main__":
    main()
