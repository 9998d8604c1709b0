"""Training throughput of the text two-tower under several recipes: one process, one run, the same
model (`model.item.encoder`, MiniLM by default) on the same prepared shards for the same number of
steps, one table.

Recipes: `naive` (MoRec style: every item occurrence of the batch encoded, no dedup, fixed padding
to data.max_text_len, the whole encoder fine-tuned, no frozen-layer cache, eager attention, fp32),
`default` (the shipped defaults), each optimisation alone on top of naive: `+dedup`,
`+dynamic_padding`, `+frozen_cache` (train_layers=1 from the frozen-bottom cache), `+sdpa`
(model.item.attention=sdpa), `+bf16` (trainer.precision=bf16-mixed), and the memory option on top of
default: `+act_ckpt` (model.item/user.activation_checkpointing=true: its RSS / GPU MB column against
default's is the point; it trades speed for that), and `+full_stale`: default with the full softmax
over a stale table (the table is re-encoded without grad every 5 steps, which its pos/s and seq/s
include and its items/s, tok/item and GFLOP/s, the steps' own encoder work, leave out).

    python bench/train_throughput.py                  # CPU, 1,000 synthetic users, 4 steps per recipe
    python bench/train_throughput.py --quick          # a smoke run (under a minute): a tiny random BERT
    python bench/train_throughput.py --device cuda --batch-size 128 --steps 20
    python bench/train_throughput.py --steps 20 data.synthetic.num_users=3000   # any config override

Columns, per recipe, over the timed steps (all but the first `--warmup` steps, data loading included):
  seq/s       training sequences per second
  pos/s       target positions (next-item predictions) per second; `x naive` is its ratio to naive's
  items/s     item rows the item tower encodes per second (each distinct item once with dedup,
              every occurrence without)
  tok/item    token width the encoder ran per item row (padding included)
  GFLOP/s     the item tower's achieved rate from the analytic count below, over the whole step time
  %fp32 %bf16 that rate as a share of the fp32 / bf16 matmul peak (torch.matmul on 2048x2048 for
              ~1.5 s each, measured at start and at end, the higher kept; --quick: 256x256, ~0.05 s)
  RSS MB      peak resident memory during the recipe (VmHWM, reset per recipe through
              /proc/self/clear_refs); on CUDA also the peak allocated GPU memory
  cache s     one-time build of the frozen-layer cache (not in the timed steps)
  NDCG@10     validation NDCG@10 after the recipe's steps (full catalogue ranking)

FLOP count of the item tower (BERT encoder layers only; embeddings, pooling and projection ignored,
< 1 %). Per encoder layer and per token of a row padded to width T, forward:
    2 * (4 * H^2 + 2 * H * I)  [Q, K, V, output projections; the two MLP matrices]
  + 2 * 2 * T * H              [Q K^T and attention x V]
with H the hidden size and I the MLP width (MiniLM-L6: H=384, I=1536, 6 layers). A layer whose
weights train runs forward + backward (x3); a frozen layer runs forward only (x1); layers served
from the frozen cache do not run in the step at all. Only layers that actually run are counted
(a hook on each layer sees its real input shape); the recompute of activation checkpointing is not
(the hook runs outside the checkpoint), so GFLOP/s stays the rate of useful work.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from twotower.configs import load_config  # noqa: E402
from twotower.datamodules.datamodule import ShardDataModule  # noqa: E402
from twotower.datamodules.prepare import prepare  # noqa: E402
from twotower.modules.lit_two_tower import TwoTowerModule  # noqa: E402

from bench.process_memory import peak_rss_mb, reset_peak_rss  # noqa: E402

NAIVE = ["model.item.dedup=false", "model.item.dynamic_padding=false", "model.item.train_layers=-1",
         "model.item.cache_frozen=false", "model.item.attention=eager", "trainer.precision=32-true"]
RECIPES = {
    "naive": NAIVE,
    "default": [],
    "+dedup": NAIVE + ["model.item.dedup=true"],
    "+dynamic_padding": NAIVE + ["model.item.dynamic_padding=true"],
    "+frozen_cache": NAIVE + ["model.item.train_layers=1", "model.item.cache_frozen=true"],
    "+sdpa": NAIVE + ["model.item.attention=sdpa"],
    "+bf16": NAIVE + ["trainer.precision=bf16-mixed"],
    "+act_ckpt": ["model.item.activation_checkpointing=true", "model.user.activation_checkpointing=true"],
    "+full_stale": ["model.loss.candidates=full", "model.loss.refresh_every=5"],
}


def matmul_peak(dtype: torch.dtype, device: str, seconds: float = 1.5, n: int = 2048) -> float:
    """GFLOP/s of torch.matmul on n x n operands, after one warm-up product."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
        if device == "cuda" and count % 50:
            continue
        sync()
    sync()
    return 2 * n**3 * count / (time.perf_counter() - started) / 1e9


class Meter(pl.Callback):
    """Counts sequences, target positions, item rows and encoder FLOPs per training step, and the
    wall time of the steps after the warm-up ones."""

    def __init__(self, module: TwoTowerModule, warmup: int):
        self.warmup, self.steps, self.started, self.ended = warmup, 0, None, None
        self.totals = dict(seqs=0, positions=0, rows=0, tokens=0, flops=0.0)
        self.step = dict(self.totals)
        tower = module.model.item_tower
        config = tower.encoder.config
        self.dense = 2 * (4 * config.hidden_size**2 + 2 * config.hidden_size * config.intermediate_size)
        self.hidden = config.hidden_size
        tower.register_forward_pre_hook(self._rows)
        for layer in tower.encoder.encoder.layer:
            layer.register_forward_pre_hook(self._layer, with_kwargs=True)

    def _rows(self, tower, args) -> None:
        if tower.training and len(args[0]):
            items = args[0]
            self.step["rows"] += len(items)
            self.step["tokens"] += sum(len(positions) * width for positions, width in tower.padded_chunks(items))

    def _layer(self, layer, args, kwargs) -> None:
        if not layer.training and not torch.is_grad_enabled():
            return  # evaluation, or the frozen cache being built
        hidden = args[0] if args else kwargs["hidden_states"]
        rows, width = hidden.shape[:2]
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters())
        self.step["flops"] += rows * width * (self.dense + 4 * width * self.hidden) * (3 if trains else 1)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.step = dict.fromkeys(self.totals, 0)
        self.step.update(seqs=batch[1].shape[0], positions=int((batch[1] >= 0).sum()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize()
        self.steps += 1
        now = time.perf_counter()
        if self.steps == self.warmup:
            self.started = now
        elif self.steps > self.warmup:
            self.ended = now
            for key, value in self.step.items():
                self.totals[key] += value

    def rates(self) -> dict[str, float]:
        seconds = (self.ended - self.started) if self.ended else float("nan")
        t = self.totals
        return dict(seconds=seconds, timed_steps=self.steps - self.warmup, seq_s=t["seqs"] / seconds,
                    pos_s=t["positions"] / seconds, items_s=t["rows"] / seconds,
                    tok_item=t["tokens"] / max(t["rows"], 1), gflops=t["flops"] / seconds / 1e9)


def run_recipe(name: str, overrides: list[str], args, device: str) -> dict[str, float]:
    cfg = load_config([], overrides)
    pl.seed_everything(cfg.seed, verbose=False)
    data = ShardDataModule(cfg)
    module = TwoTowerModule(cfg, data.num_items, data.catalogue.train_counts, data.catalogue.cold)
    # Fixed padding means data.max_text_len: pad the catalogue that wide (dynamic padding trims it).
    tokens = data.catalogue.tokens
    if tokens.shape[1] < cfg.data.max_text_len:
        tokens = torch.nn.functional.pad(tokens, (0, cfg.data.max_text_len - tokens.shape[1]))
    module.model.item_tower.set_catalogue(tokens, data.catalogue.lengths)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    module.to(device)
    reset_peak_rss()
    started = time.perf_counter()
    module.model.item_tower.build_frozen_cache(cfg.eval.item_batch_size)  # on_fit_start then finds it built
    cache_s = time.perf_counter() - started
    meter = Meter(module, args.warmup)
    common = dict(accelerator=device, devices=1, precision=cfg.trainer.precision, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer = pl.Trainer(**common, max_steps=args.steps, max_epochs=-1, limit_val_batches=0, callbacks=[meter],
                         gradient_clip_val=cfg.trainer.gradient_clip_val or None, reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=data)
    row = meter.rates()
    row["rss_mb"] = peak_rss_mb()
    row["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    row["cache_s"] = cache_s
    validated = pl.Trainer(**common).validate(module, datamodule=data, verbose=False)[0]
    row["ndcg"] = validated["val/ndcg@10"]
    row["precision"] = cfg.trainer.precision
    return row


def table(rows: dict[str, dict], peaks: dict[str, float], device: str) -> str:
    head = (f"{'recipe':<17}{'seq/s':>8}{'pos/s':>9}{'x naive':>8}{'items/s':>9}{'tok/item':>9}{'GFLOP/s':>9}"
            f"{'%fp32':>7}{'%bf16':>7}{'RSS MB':>8}" + (f"{'GPU MB':>8}" if device == "cuda" else "")
            + f"{'cache s':>8}{'NDCG@10':>9}")
    lines = [head, "-" * len(head)]
    naive = rows.get("naive", {}).get("pos_s", float("nan"))
    for name, r in rows.items():
        lines.append(f"{name:<17}{r['seq_s']:>8.1f}{r['pos_s']:>9.1f}{r['pos_s'] / naive:>8.2f}{r['items_s']:>9.1f}"
                     f"{r['tok_item']:>9.1f}{r['gflops']:>9.1f}{100 * r['gflops'] / peaks['fp32']:>6.0f}%"
                     f"{100 * r['gflops'] / peaks['bf16']:>6.0f}%{r['rss_mb']:>8.0f}"
                     + (f"{r['gpu_mb']:>8.0f}" if device == "cuda" else "") + f"{r['cache_s']:>8.1f}{r['ndcg']:>9.4f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps per recipe (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the timing (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: %(default)s)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores; --quick: 1)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset of: %(default)s")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: a tiny random BERT, 200 users, tiny batches, 3 steps, 50 validation users, "
                             "1 thread")
    parser.add_argument("--out", help="working folder (default: a new temporary one)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every recipe")
    args = parser.parse_args()
    # The matmul peak: 2048^2 operands for ~1.5 s each (one bf16 product alone takes about a minute on a
    # CPU without bf16 matmul units); --quick: 256^2 for ~0.05 s, enough for the column to exist.
    peak_n, peak_s = 2048, 1.5
    quick_overrides, tiny = [], None
    if args.quick:
        # A smoke run, so that the benchmark cannot rot: every recipe end to end, numbers meaningless.
        # A 2-layer, 32-wide random BERT (MiniLM's tokenizer) instead of MiniLM: the bf16 recipe alone
        # took minutes of MiniLM on CPU (the whole quick run 674 s on 2 busy cores; now ~25 s).
        args.steps, args.batch_size = 3, 2
        peak_n, peak_s = 256, 0.05
        quick_overrides = ["data.synthetic.num_users=200", "data.synthetic.num_items=120", "data.max_len=5",
                           "model.loss.num_negatives=8", "trainer.limit_val_users=50"]
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    # --quick runs on one thread: next to other jobs (a CI runner, pytest -n), tiny ops on several
    # threads spent most of their time waiting for each other (81 s against 25 s on 2 busy cores).
    torch.set_num_threads(args.threads or (1 if args.quick else os.cpu_count()))
    work = Path(args.out or tempfile.mkdtemp(prefix="tput_"))
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from helpers import save_tiny_bert

        tiny = save_tiny_bert(work / "tiny-bert")
        quick_overrides.append(f"model.item.encoder={tiny}")
    args.overrides = [*quick_overrides, *args.overrides]
    # The synthetic texts run 19-39 MiniLM tokens (median 27); a fixed-padding recipe that must not
    # truncate pads them to 64.
    common = ["model.mode=text", "data.synthetic.num_users=1000", "data.max_len=10", "data.max_text_len=64",
              "model.loss.num_negatives=32",
              f"data.batch_size={args.batch_size}", "data.shuffle_buffer=100", "logger.wandb.mode=disabled",
              f"data.dir={work / 'data'}", f"run.dir={work / 'run'}", *args.overrides]
    cfg = load_config([], common)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"bench/train_throughput.py: device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f"; {cpu}; {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    encoder = cfg.model.item.encoder
    if encoder == tiny:
        encoder = f"a tiny random BERT (2 layers, 32 wide, MiniLM's tokenizer; --quick) at {tiny}"
    print(f"steps {args.steps} per recipe ({args.warmup} warm-up, not timed); encoder {encoder}, "
          f"batch {cfg.data.batch_size}, max_len {cfg.data.max_len}, max_text_len {cfg.data.max_text_len}, "
          f"negatives {cfg.model.loss.num_negatives}, users {cfg.data.synthetic.num_users}, items {cfg.data.synthetic.num_items}")
    if args.quick:
        print(f"--quick: a smoke run, its numbers mean nothing; matmul peak on {peak_n}^2 for {peak_s} s; "
              f"validation on {cfg.trainer.limit_val_users or 'all'} users")
    print(f"common overrides: {' '.join(common)}")
    prepare(cfg)
    peaks = {name: matmul_peak(dtype, args.device, peak_s, peak_n)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"matmul peak ({peak_n}^2): fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s")
    rows = {}
    for name in args.recipes.split(","):
        overrides = common + RECIPES[name]
        print(f"[{name}] {' '.join(RECIPES[name]) or '(shipped defaults)'}", flush=True)
        rows[name] = run_recipe(name, overrides, args, args.device)
        r = rows[name]
        print(f"[{name}] {r['timed_steps']} timed steps in {r['seconds']:.1f}s, {r['precision']}", flush=True)
    # Measured again at the end, the higher kept: a peak taken while other processes held the cores
    # would flatter every share.
    again = {name: matmul_peak(dtype, args.device, peak_s, peak_n)
             for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"\nmatmul peak at end: fp32 {again['fp32']:.0f}, bf16 {again['bf16']:.0f} GFLOP/s (the higher of start and end is used)")
    peaks = {name: max(peaks[name], again[name]) for name in peaks}
    print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(table(rows, peaks, args.device))


if __name__ == "__main__":
    main()
