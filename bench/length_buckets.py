"""Length buckets (`model.item.bucket_items`) against one chunk padded to the longest text: the time
of one forward and backward of the whole catalogue through the item tower (what a full-softmax step
with a trainable encoder layer costs), side by side in one process.

    python bench/length_buckets.py                               # ../shared/data/ml-100k items.csv
    python bench/length_buckets.py --items FILE --buckets 0,128,256 --train-layers 1 --threads 1
    python bench/length_buckets.py --quick                       # a smoke run: 200 synthetic items

Each row builds the same tower (MiniLM, `model.item.train_layers`, frozen-layer cache, the same
seed), encodes the catalogue in eval mode (its max difference from the first row's vectors is
printed: buckets change the work, not the vectors), then times `--reps` training passes
(forward, sum of squares, backward) and keeps the fastest. Tokens = the padded tokens the
trainable layers ran per pass.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from twotower.configs.schema import ItemTowerConfig, SyntheticConfig  # noqa: E402
from twotower.datamodules.synthetic import catalogue as synthetic_catalogue  # noqa: E402
from twotower.modules.item_text import item_texts, load_tokenizer, tokenize  # noqa: E402
from twotower.modules.item_tower import ItemTower  # noqa: E402
from twotower.tables import markdown_table  # noqa: E402

DEFAULT_ITEMS = REPO.parent / "shared" / "data" / "ml-100k" / "items.csv"


def catalogue(args: argparse.Namespace) -> tuple[str, list[str]]:
    if args.quick:
        items = synthetic_catalogue(SyntheticConfig(num_items=200))
        return "synthetic, 200 items", item_texts(items.to_dict("records"), ["title", "text"])
    path = Path(args.items or DEFAULT_ITEMS)
    if not path.is_file():
        print(f"bench/length_buckets.py: skipped: no items file at {path} (pass --items FILE or --quick)")
        sys.exit(0)
    items = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [f for f in args.fields.split(",") if f not in items.columns]
    if missing:
        sys.exit(f"{path}: no column {', '.join(missing)} (have {', '.join(items.columns)}); pass --fields")
    return str(path), item_texts(items.to_dict("records"), args.fields.split(","))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", help=f"items CSV with an item per row (default: {DEFAULT_ITEMS})")
    parser.add_argument("--fields", default="title,text", help="text columns, in order (default: title,text)")
    parser.add_argument("--quick", action="store_true", help="200 synthetic items instead of a file")
    parser.add_argument("--buckets", default="0,64,128,256,512", help="bucket_items values; 0 is one chunk")
    parser.add_argument("--train-layers", type=int, default=1, help="model.item.train_layers (default 1)")
    parser.add_argument("--max-text-len", type=int, default=32, help="tokens kept per item (default 32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    source, texts = catalogue(args)
    ids = tokenize(load_tokenizer("minilm"), texts, args.max_text_len)
    lengths = torch.tensor([len(t) for t in ids])
    tokens = torch.zeros(len(ids), args.max_text_len, dtype=torch.long)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = torch.from_numpy(t.astype(np.int64))
    items = torch.arange(len(ids))
    print(f"# {source}: {len(ids)} items, tokens per item mean {lengths.float().mean():.1f}, longest {int(lengths.max())}; "
          f"MiniLM, train_layers={args.train_layers}, frozen cache, {args.threads} thread(s), best of {args.reps}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    columns = ["bucket_items", "chunks", "padded tokens", "fwd+bwd s", "speed-up vs first row", "max abs diff of vectors"]
    rows, first = [], None
    for bucket_items in [int(b) for b in args.buckets.split(",")]:
        torch.manual_seed(0)
        tower = ItemTower(ItemTowerConfig(train_layers=args.train_layers, bucket_items=bucket_items), "text", len(ids), 64)
        tower.set_catalogue(tokens, lengths)
        tower.build_frozen_cache()
        chunks = tower.padded_chunks(items)
        with torch.no_grad():
            vectors = tower.eval()(items)
        tower.train()
        seconds = []
        for _ in range(args.reps):
            started = time.perf_counter()
            tower(items).square().sum().backward()
            seconds.append(time.perf_counter() - started)
        first = first or (min(seconds), vectors)
        rows.append(dict(zip(columns, [bucket_items, len(chunks), sum(len(p) * w for p, w in chunks), f"{min(seconds):.2f}",
                                       f"{first[0] / min(seconds):.2f}x", f"{float((vectors - first[1]).abs().max()):.1e}"])))
    print(markdown_table(rows, columns))


if __name__ == "__main__":
    main()
