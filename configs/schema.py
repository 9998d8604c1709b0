"""Typed configuration for every twotower command.

Each dataclass is an OmegaConf structured config: the string under a field is its documentation,
`__post_init__` validates it once (at load time, before any work starts), and an unknown key is
rejected by OmegaConf's struct mode (see `configs.loader`, which adds the closest valid spelling).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from twotower.configs.serving import ServingConfig
from twotower.configs.stream import StreamConfig

ITEM_MODES = ("id", "text", "id+text")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(choices)}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{key}={value!r}: expected a {'non-negative' if allow_zero else 'positive'} number")


@dataclass
class ColumnsConfig:
    """How the columns of a generic interactions file are named."""

    user_id: str = "user_id"
    "Column holding the user id."
    item_id: str = "item_id"
    "Column holding the item id (the same ids as the items file)."
    timestamp: str = "timestamp"
    "Column holding the event time (number or ISO date); orders each user's sequence."
    rating: Optional[str] = "rating"
    "Optional explicit rating column; used when present, ignored when absent."
    event: Optional[str] = "event"
    "Optional action-type column (click, buy, ...); used when present, ignored when absent."


@dataclass
class SyntheticConfig:
    """The built-in data: users with drifting latent interests over topic-labelled items."""

    num_users: int = 3000
    "Number of users generated."
    num_items: int = 1000
    "Number of items in the catalogue."
    num_topics: int = 16
    "Latent topics; each item has one main topic, and its text is drawn from that topic's words."
    interests_per_user: int = 2
    "Topics a user is interested in at any one time."
    drift: float = 0.05
    "Per-event probability that one of the user's interests is replaced by another topic."
    mean_events: float = 30.0
    "Mean interactions per user (geometric-like, at least `min_events`)."
    min_events: int = 5
    "Fewest interactions a user gets."
    zipf_exponent: float = 1.0
    "Exponent of the Zipf popularity of items within a topic."
    late_item_fraction: float = 0.1
    "Share of items that exist only in the last part of the timeline (new items, cold at first)."
    stray_fraction: float = 0.0
    "Share of events that stray: the item is drawn from a random topic instead of the user's interests, and the event column says `skip` (others `view`); 0: no stray events and no event column."
    seed: int = 0
    "Seed of the generator: the same seed gives the same data."

    def __post_init__(self) -> None:
        for key in ("num_users", "num_items", "num_topics", "interests_per_user", "min_events"):
            _check_positive(f"data.synthetic.{key}", getattr(self, key))
        if not 0.0 <= self.late_item_fraction < 1.0:
            raise ValueError(f"data.synthetic.late_item_fraction={self.late_item_fraction}: expected 0 <= x < 1")
        if not 0.0 <= self.stray_fraction < 1.0:
            raise ValueError(f"data.synthetic.stray_fraction={self.stray_fraction}: expected 0 <= x < 1")
        if not 0.0 <= self.drift <= 1.0:
            raise ValueError(f"data.synthetic.drift={self.drift}: expected 0 <= x <= 1")
        if self.interests_per_user > self.num_topics:
            raise ValueError("data.synthetic.interests_per_user must not exceed data.synthetic.num_topics")


@dataclass
class DataConfig:
    """Where interactions come from, how they become shards, and how shards are read."""

    name: str = "synthetic"
    "Name of the data set; the prepared shards go to `data.dir`."
    source: str = "synthetic"
    "synthetic (built in, no download) | table (CSV/Parquet/JSONL files) | movielens (native ML-100K/1M folder) | amazon (Amazon Reviews 2018/2023 JSON Lines)."
    path: Optional[str] = None
    "movielens: the folder with u.data/u.item or ratings.dat/movies.dat."
    interactions: Optional[str] = None
    "table: the interactions file (.csv, .parquet, .jsonl)."
    items: Optional[str] = None
    "table: the items file (.csv, .parquet, .jsonl) with `item_id` and text fields."
    reviews: Optional[str] = None
    "amazon: the reviews file (JSON Lines, plain or gzipped), 2018 or 2023 release (told apart by its fields)."
    metadata: Optional[str] = None
    "amazon: the item metadata file of the same release (JSON Lines, plain or gzipped); see datamodules/amazon.py."
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    "table: column names of the interactions file."
    item_id_column: str = "item_id"
    "table: the id column of the items file."
    actions: str = "auto"
    "What each interaction's action code (the user tower's action feature) is read from: auto (the event column when the data has one, else the rating column, else none) | event | rating | none. Each distinct value is one code (at most 255), listed in manifest.json's `actions`."
    text_fields: list[str] = field(default_factory=lambda: ["title", "text"])
    "Item fields joined, in this order and each with its name, into the text the item tower reads."
    on_bad_row: str = "raise"
    "raise: stop at the first bad row, naming file, row and problem | skip: drop it and count it in the manifest."
    on_error: str = "raise"
    "Prepared shards that cannot be read (missing, truncated, a member that does not decode, counts that disagree with manifest.json): raise: stop, naming file and member | skip: drop what cannot be read, log it and count it in summary.json (`data/skipped_samples`, `data/skipped_shards`; details in data_faults.json). Item shards are never skipped."
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    "The built-in generator's settings (source=synthetic)."
    since: Optional[float] = None
    "Keep only interactions at or after this time (epoch seconds; null: no bound). With `prepare --append`: the new time window."
    until: Optional[float] = None
    "Keep only interactions before this time (epoch seconds; null: no bound)."
    dir: str = "data/${data.name}"
    "Folder of the prepared shards and manifest.json."
    engine: str = "pandas"
    "What runs `twotower prepare`: pandas (one process; the small-data default) | ray (Ray: a map-reduce over every core of this machine, or of a cluster with data.engine_address; data.source=table only; the same shards). See docs/data.md, Data at scale."
    engine_address: Optional[str] = None
    "data.engine=ray: the cluster to join (e.g. ray://head:10001 or auto; null: the RAY_ADDRESS variable, else a Ray started on this machine). data.dir must then be a folder every machine sees."
    engine_partitions: int = 0
    "data.engine=ray: reduce tasks (each writes its own shards of its users); 0: twice the cluster's CPUs, or one per 500k input events when that is more (so a task's memory stays bounded)."
    cache_dir: Optional[str] = None
    "Where each machine keeps the item catalogue read from the item shards (token ids, lengths, counts, ids, texts as .npy files), built once by the first process of the machine and memory-mapped by all of its ranks, so it is in memory once per machine, not once per rank. A folder on the machine's own disk; entries are named by a hash of manifest.json and the item shards, so a changed or re-prepared set gets a new one (old ones may be deleted at any time). null: twotower-<uid>/catalogue in the system temp folder."
    shards_url: Optional[str] = None
    "Read the prepared shards from this URL instead of data.dir (s3://bucket/prefix, http(s)://host/prefix, gs://bucket/prefix, file:///abs/path; null: data.dir). It is the base of a shard set that `twotower prepare` wrote (the folder with manifest.json and the split folders); the manifest, training, evaluation and item shards are all read from there through fsspec (s3 needs s3fs, installed with twotower[train]; gs needs gcsfs). S3 endpoint and credentials come from the usual variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...) or fsspec's FSSPEC_S3_* options. fit then prepares nothing and no local data.dir is needed: upload the set with `aws s3 sync` or the like (docs/data.md, Shards on object storage)."
    max_text_len: int = 32
    "Item text is tokenised and truncated to this many tokens at prepare time."
    shard_max_count: int = 10000
    "Most samples per tar shard."
    max_len: int = 50
    "Most recent items of a user's history fed to the user tower (training crops to the last max_len+1)."
    batch_size: int = 256
    "Training sequences per batch (per device)."
    eval_batch_size: int = 256
    "Users per evaluation batch."
    shuffle_buffer: int = 1000
    "WebDataset shuffle buffer (samples); small values keep tests fast."
    num_workers: int = 0
    "DataLoader workers for training shards (per rank)."
    resample: Optional[bool] = None
    "Training shards: true: each rank/worker draws shards with replacement (any shard count works) | false: shards are split by node and worker, each read once per pass (needs at least ranks x workers shards) | null: resample when more than one rank trains. Either way every rank gets the same number of batches per epoch."

    def __post_init__(self) -> None:
        _check_choice("data.source", self.source, ("synthetic", "table", "movielens", "amazon"))
        _check_choice("data.on_bad_row", self.on_bad_row, ("raise", "skip"))
        _check_choice("data.on_error", self.on_error, ("raise", "skip"))
        _check_choice("data.actions", self.actions, ("auto", "event", "rating", "none"))
        _check_choice("data.engine", self.engine, ("pandas", "ray"))
        if self.source == "table" and not (self.interactions and self.items):
            raise ValueError("data.source=table needs data.interactions and data.items (file paths)")
        if self.source == "movielens" and not self.path:
            raise ValueError("data.source=movielens needs data.path (the MovieLens folder)")
        if self.source == "amazon" and not (self.reviews and self.metadata):
            raise ValueError("data.source=amazon needs data.reviews and data.metadata (file paths)")
        if not self.text_fields:
            raise ValueError("data.text_fields: expected at least one field name")
        for key in ("max_text_len", "shard_max_count", "max_len", "batch_size", "eval_batch_size", "shuffle_buffer"):
            _check_positive(f"data.{key}", getattr(self, key))
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError(f"data.since={self.since} must be before data.until={self.until}")


@dataclass
class SplitConfig:
    """The evaluation protocol (docs/data.md): leave-one-out by time, optional cold items."""

    min_interactions: int = 3
    "Users with fewer interactions are dropped."
    cold_item_fraction: float = 0.0
    "Share of items held out of training entirely; `cold_valid` and `cold` rank them for users who touched one."
    cold_valid_share: float = 0.5
    "Share of the held-out items whose cases form `cold_valid` (for choosing settings); the rest form `cold` (for reporting)."
    seed: int = 0
    "Seed of the cold-item draw (and of its cut into cold_valid and cold)."

    def __post_init__(self) -> None:
        if self.min_interactions < 3:
            raise ValueError("split.min_interactions: expected >= 3 (train, valid and test each need one event)")
        if not 0.0 <= self.cold_item_fraction < 1.0:
            raise ValueError(f"split.cold_item_fraction={self.cold_item_fraction}: expected 0 <= x < 1")
        if not 0.0 <= self.cold_valid_share <= 1.0:
            raise ValueError(f"split.cold_valid_share={self.cold_valid_share}: expected 0 <= x <= 1")


@dataclass
class ItemTowerConfig:
    """f(item): a BERT-family encoder over item text, pooled and projected (plus an optional ID embedding)."""

    encoder: str = "minilm"
    "minilm (the packaged all-MiniLM-L6-v2, offline) | a Hugging Face hub name | a local folder."
    pooling: str = "mean"
    "cls | mean (mask-aware mean over tokens)."
    text_adapter: str = "mlp"
    "Between pooling and projection: mlp (a hidden-wide Linear + GELU first, so a frozen encoder's vectors are remapped non-linearly; chosen on ML-100K validation, frozen MiniLM: text mode 0.1266 against 0.1017 with linear, id+text level; checkpoints and exports written before this key existed load as linear) | linear (the projection alone)."
    train_layers: int = 1
    "-1: the whole encoder trains; 0: frozen; N: only the top N transformer layers train."
    lr_scale: float = 0.1
    "The encoder's learning rate is trainer.lr times this."
    cache_frozen: bool = True
    "With 0 < train_layers < all: run the frozen bottom layers once per item and train the top layers from that cache (frozen layers then run as at inference, without dropout). With train_layers=0 the cache holds each item's pooled vector (N x hidden), not its tokens' states (N x T x hidden)."
    frozen_cache_dir: Optional[str] = None
    "Where the frozen-layer cache lives: null: in RAM | a folder: a memory-mapped .npy file there, named by a hash of the catalogue's tokens and the frozen weights, reused by later runs (fit, evaluate, export) and read from disk as pages are needed, for catalogues whose cache outgrows RAM."
    id_init_std: float = 0.02
    "Standard deviation of the ID embeddings' normal initialisation (id and id+text modes; SASRec's 0.02: small random starts that training quickly outgrows, chosen on ML-100K validation over 0.125)."
    id_dropout: float = 0.0
    "id+text, training: the share of item vectors (per step) whose ID part is dropped, so the text part learns to stand alone, as it must for items that never trained (DropoutNet); 0: off."
    dedup: bool = True
    "Sampled candidates: encode each distinct item of a batch (history, targets, negatives) once and read its vector back by index | false: encode every occurrence (the naive recipe; same loss and gradients, more encoder work)."
    dynamic_padding: bool = True
    "Trim each step's item tokens to the longest text among its items | false: always run as many tokens as the catalogue's longest text (data.max_text_len when any text was truncated; the naive recipe: same vectors, more encoder work)."
    bucket_items: int = 256
    "With dynamic_padding: a call with more items than this (the full-catalogue softmax, a large batch's distinct items, catalogue encoding) is sorted by text length and run in chunks of this many, each trimmed to its own longest text (same vectors, fewer padded tokens); 0: one chunk at the longest text of all."
    attention: str = "sdpa"
    "Encoder attention: sdpa (torch's fused scaled_dot_product_attention) | eager (softmax(QK^T)V spelled out, the naive recipe; same vectors, more memory traffic)."
    activation_checkpointing: bool = False
    "Training: keep only each encoder layer's input and recompute its activations in the backward pass (less activation memory, one more forward of the trainable layers per step; same loss and gradients, dropout included)."

    def __post_init__(self) -> None:
        _check_choice("model.item.pooling", self.pooling, ("cls", "mean"))
        _check_choice("model.item.attention", self.attention, ("sdpa", "eager"))
        _check_choice("model.item.text_adapter", self.text_adapter, ("linear", "mlp"))
        if self.train_layers < -1:
            raise ValueError("model.item.train_layers: expected -1 (all), 0 (none) or N > 0 (top N)")
        _check_positive("model.item.lr_scale", self.lr_scale, allow_zero=True)
        _check_positive("model.item.id_init_std", self.id_init_std)
        _check_positive("model.item.bucket_items", self.bucket_items, allow_zero=True)
        if not 0.0 <= self.id_dropout < 1.0:
            raise ValueError(f"model.item.id_dropout={self.id_dropout}: expected 0 <= x < 1")


@dataclass
class UserTowerConfig:
    """g(history): a causal transformer over the item vectors of the history, with learned positions."""

    architecture: str = "sasrec"
    "Block design: sasrec (SASRec's own: inputs x sqrt(dim), query from LayerNorm(x) with keys and values from x, residuals added to the normalised stream, point-wise ReLU feed-forward, N(0, 0.02) init) | pre_ln (GPT-2 pre-LayerNorm blocks with a GELU MLP)."
    layers: int = 2
    "Transformer blocks."
    heads: int = 2
    "Attention heads per block."
    dropout: float = 0.1
    "Dropout on inputs, attention and MLP."
    positions: str = "from_start"
    "Learned positions count from_end (the newest item is always the last position) | from_start (the oldest item shown is position 0, as SASRec counts: the model also knows how far into the shown history each item is)."
    ffn_mult: int = 1
    "Width of each block's MLP as a multiple of model.dim (4: GPT/BERT; 1: SASRec's point-wise feed-forward)."
    activation_checkpointing: bool = False
    "Training: keep only each block's input and recompute its activations in the backward pass (less activation memory, one more forward per step; same loss and gradients, dropout included)."
    time_gaps: bool = False
    "Add to each history item a learned embedding of the time since the user's previous interaction, in log2 buckets (same second, 1 s, 2-3 s, 4-7 s, ... up to about a year and beyond)."
    actions: bool = False
    "Add to each history item a learned embedding of its action code (data.actions: the event type or the rating given)."
    max_len: int = "${data.max_len}"  # type: ignore[assignment]
    "Positions the tower can see (the data's max_len)."

    def __post_init__(self) -> None:
        _check_positive("model.user.layers", self.layers)
        _check_positive("model.user.heads", self.heads)
        _check_positive("model.user.ffn_mult", self.ffn_mult)
        _check_choice("model.user.positions", self.positions, ("from_end", "from_start"))
        _check_choice("model.user.architecture", self.architecture, ("sasrec", "pre_ln"))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.user.dropout={self.dropout}: expected 0 <= x < 1")


@dataclass
class LossConfig:
    """Softmax cross-entropy of the next item against a candidate set."""

    candidates: str = "auto"
    "full: the whole catalogue every step (in text modes cheap with a frozen, cached encoder, or with trainable layers over a stale table: refresh_every) | sampled: the batch's items + uniform negatives | auto: full when a batch's logits fit full_max_logits and no encoder layer trains (id mode, or model.item.train_layers=0 with the frozen cache), else sampled (with a trainable layer the stale table tied on amazon-office's warm validation and lost on the built-in data: README, issue 23)."
    refresh_every: int = 0
    "Full candidates with trainable encoder layers: 0: every step encodes the whole catalogue with grad (exact; the cost of a batch of N items) | K > 0: the candidates read a stale table of every item's pooled text, re-encoded without grad (no dropout) every K training steps, and the encoder trains through the histories alone, encoded afresh each step (MoCo's queries and keys); the projection, ID rows and softmax still cover the whole catalogue with grad. Checkpoints (and the learner's state) keep the table, so a resumed run reads what the uninterrupted one reads."
    full_max_logits: int = 2**28
    "auto picks the full softmax only while data.batch_size x data.max_len x catalogue size is at most this (each logit costs about 11 bytes of peak memory through the softmax and its gradient: 2^28 is about 3 GB)."
    num_negatives: int = 256
    "Uniformly sampled extra negatives per step (sampled candidates)."
    logq: bool = True
    "Subtract log of each candidate's inclusion probability (sampled candidates)."
    temperature: float = 1.0
    "Logits are scores divided by this."
    cold_weight: float = 0.0
    "id+text (ignored by the other modes): trains a new-item head, the vector of an item without a trained ID row (held out, or added after training: `POST /items`) from its pooled text, against the model's own user and item vectors held fixed, so the model is the one trained without it; the value is the prior odds of a new item against a trained one (1: they compete as equals; below 1: a new item must score higher to rank above a trained one), chosen on cold_valid and valid together; 0: no head, a new item gets its text vector alone (which id+text users barely read). Costs one more head pass over each step's candidates and a second logits matrix."
    local_loss: bool = False
    "Sampled candidates under DDP/DeepSpeed: false: each rank's softmax runs over the candidates (batch items, negatives, their logQ and ids) gathered from every rank, with gradients | true: over its own batch's candidates only (no cross-rank traffic, fewer negatives). Queries are always the rank's own."

    def __post_init__(self) -> None:
        _check_choice("model.loss.candidates", self.candidates, ("auto", "full", "sampled"))
        _check_positive("model.loss.temperature", self.temperature)
        _check_positive("model.loss.num_negatives", self.num_negatives, allow_zero=True)
        _check_positive("model.loss.full_max_logits", self.full_max_logits)
        _check_positive("model.loss.refresh_every", self.refresh_every, allow_zero=True)
        _check_positive("model.loss.cold_weight", self.cold_weight, allow_zero=True)


@dataclass
class ModelConfig:
    """The two towers and the objective."""

    mode: str = "text"
    "id: learned item embeddings only (SASRec-style) | text: item tower on text | id+text: both, summed."
    dim: int = 64
    "Size of the shared item/user vector space."
    item: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    "Item tower."
    user: UserTowerConfig = field(default_factory=UserTowerConfig)
    "User tower."
    loss: LossConfig = field(default_factory=LossConfig)
    "Objective."

    def __post_init__(self) -> None:
        _check_choice("model.mode", self.mode, ITEM_MODES)
        _check_positive("model.dim", self.dim)
        if self.dim % self.user.heads:
            raise ValueError(f"model.dim={self.dim} must be divisible by model.user.heads={self.user.heads}")


@dataclass
class TrainerConfig:
    """The Lightning Trainer and optimiser."""

    max_epochs: int = 5
    "Epochs (one epoch = every training user once, per rank)."
    max_steps: int = -1
    "Stop after this many optimiser steps (-1: no limit)."
    lr: float = 3e-3
    "AdamW learning rate of the towers (the encoder uses model.item.lr_scale times this)."
    weight_decay: float = 0.0
    "AdamW weight decay."
    warmup_steps: int = 10
    "Linear warm-up steps, then constant (or lowered on a plateau: trainer.lr_plateau_patience)."
    lr_plateau_patience: int = 0
    "Multiply every learning rate by trainer.lr_plateau_factor each time val/ndcg@10 has not improved for this many validations (torch's ReduceLROnPlateau), and go on from the best weights so far with fresh optimizer moments; keep it below trainer.patience so the lower rate gets its turn before early stopping. 0: off."
    lr_plateau_factor: float = 0.1
    "What trainer.lr_plateau_patience multiplies the learning rate by, in (0, 1)."
    gradient_clip_val: float = 1.0
    "Clip the gradient norm to this (0: off)."
    accumulate_grad_batches: int = 1
    "Batches per optimiser step."
    accelerator: str = "cpu"
    "cpu | gpu | auto."
    devices: int = 1
    "Devices (processes) per node; under torchrun/SLURM it must match the processes launched per node."
    num_nodes: int = 1
    "Nodes; world size = num_nodes x devices."
    strategy: str = "auto"
    "auto (one process, or Lightning's choice) | ddp | deepspeed (ZeRO, stage from trainer.zero_stage; also on CPU with gloo)."
    zero_stage: int = 2
    "DeepSpeed ZeRO stage: 1 (optimizer state sharded) | 2 (+ gradients) | 3 (+ parameters)."
    offload_optimizer: bool = False
    "DeepSpeed: keep optimizer state in CPU memory and step there (DeepSpeedCPUAdam, JIT-built C++)."
    offload_parameters: bool = False
    "DeepSpeed: keep parameters in CPU memory between uses (needs zero_stage=3)."
    process_group_backend: Optional[str] = None
    "torch.distributed backend: null (nccl on GPU, gloo on CPU) | nccl | gloo."
    collective_timeout_s: int = 1800
    "ddp / deepspeed: a collective (all-reduce, gather) that waits longer than this fails the rank with an error instead of hanging (a node lost silently, frozen or cut off): seconds. A node whose processes die is noticed at once (its connections close)."
    resume: Optional[str] = None
    "Resume training from a checkpoint (file, or ZeRO checkpoint folder) | auto: the run folder's checkpoints/last.ckpt when it exists (what a SLURM requeue relies on) | null: start fresh."
    init_weights: Optional[str] = None
    "Start from the weights of a checkpoint (a file, or a ZeRO checkpoint folder) with a fresh optimizer, schedule and epoch count: e.g. a run with the encoder frozen, then its top layers fine-tuned (`model.item.train_layers`, linear probing then fine-tuning). The model's parameters (mode, dim, catalogue) must match; training settings may differ. A run that resumes (trainer.resume) continues its own checkpoint instead. null: the pretrained encoder and freshly initialised towers."
    precision: str = "32-true"
    "Lightning precision: 32-true | bf16-mixed (GPU; on CPU with auto/ddp)."
    patience: int = 0
    "Stop when val/ndcg@10 has not improved for this many validations (0: off)."
    limit_val_users: int = 0
    "Validate on at most this many users (0: all); test always uses all."
    log_every_n_steps: int = 10
    "Log training metrics every N steps."
    num_threads: int = 0
    "torch threads (0: leave torch's default)."
    on_nan: str = "raise"
    "NaN/Inf loss or gradients: raise (stop, naming the step and the last good checkpoint) | skip (drop that step's update, count it as train/skipped_steps; not under DeepSpeed)."

    def __post_init__(self) -> None:
        _check_positive("trainer.max_epochs", self.max_epochs)
        _check_positive("trainer.lr", self.lr)
        _check_positive("trainer.devices", self.devices)
        _check_choice("trainer.accelerator", self.accelerator, ("cpu", "gpu", "auto"))
        _check_choice("trainer.precision", self.precision, ("32-true", "bf16-mixed"))
        _check_positive("trainer.num_nodes", self.num_nodes)
        _check_choice("trainer.strategy", self.strategy, ("auto", "ddp", "deepspeed"))
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"trainer.zero_stage={self.zero_stage}: expected 1, 2 or 3")
        if self.offload_parameters and self.zero_stage != 3:
            raise ValueError("trainer.offload_parameters=true needs trainer.zero_stage=3")
        if (self.offload_optimizer or self.offload_parameters) and self.strategy != "deepspeed":
            raise ValueError("trainer.offload_optimizer/offload_parameters need trainer.strategy=deepspeed")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"trainer.collective_timeout_s={self.collective_timeout_s}: expected seconds > 0")
        if self.process_group_backend is not None:
            _check_choice("trainer.process_group_backend", self.process_group_backend, ("nccl", "gloo"))
        _check_positive("trainer.accumulate_grad_batches", self.accumulate_grad_batches)
        _check_choice("trainer.on_nan", self.on_nan, ("raise", "skip"))
        if self.lr_plateau_patience < 0:
            raise ValueError(f"trainer.lr_plateau_patience={self.lr_plateau_patience}: expected validations >= 0 (0: off)")
        if not 0 < self.lr_plateau_factor < 1:
            raise ValueError(f"trainer.lr_plateau_factor={self.lr_plateau_factor}: expected a factor in (0, 1)")
        if self.lr_plateau_patience and self.strategy == "deepspeed":
            raise ValueError("trainer.lr_plateau_patience needs trainer.strategy auto or ddp (it restores the best weights from a one-file checkpoint)")
        if self.strategy == "deepspeed" and self.accelerator == "cpu" and self.devices * self.num_nodes == 1:
            raise ValueError("trainer.strategy=deepspeed with trainer.accelerator=cpu and one process (trainer.devices=1, "
                             "trainer.num_nodes=1): ZeRO shards across processes; set trainer.devices=2 or more, or trainer.strategy=auto")
        if self.on_nan == "skip" and self.strategy == "deepspeed":
            raise ValueError("trainer.on_nan=skip needs trainer.strategy auto or ddp (DeepSpeed steps its own optimizer)")


@dataclass
class UpdateConfig:
    """`twotower update`: continue training a checkpoint on data appended by `prepare --append`."""

    epochs: int = 3
    "Epochs over the users with new interactions (plus the replay share); the best by val/ndcg@10 of the new window is kept."
    replay_fraction: float = 0.3
    "Share of each update epoch's sequences drawn from users without new interactions (against forgetting)."
    lr: Optional[float] = None
    "Learning rate of the update (null: trainer.lr); the optimizer starts fresh, with trainer.warmup_steps."

    def __post_init__(self) -> None:
        _check_positive("update.epochs", self.epochs)
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"update.replay_fraction={self.replay_fraction}: expected 0 <= x < 1")
        if self.lr is not None:
            _check_positive("update.lr", self.lr)


@dataclass
class LearnConfig:
    """`twotower learn`: keep training a checkpoint on the event stream (`stream.url`), continuously."""

    dir: str = "${run.dir}/learn"
    "The learner's folder: state.pt (weights, optimizer and the stream offsets, committed together) and the event and item tables it learnt from (events/, items/: Parquet parts that `prepare` reads)."
    step_events: int = 256
    "Most new events one step learns (fewer when the stream has fewer; a step waits for none)."
    step_wait_s: float = 1.0
    "A step that finds fewer than step_events new events waits up to this long for more (a live stream at 20 events/s would otherwise make steps of one or two events, each a full optimizer step); 0: take what is there."
    replay_fraction: float = 0.33
    "Share of each step's sequences that replay older events of other users (against forgetting); a replayed sequence's targets are all older than the step's new events. Chosen with replay_len on the first two windows of bench/online.py's built-in timeline (lr 1e-4, no dropout, history_len 16), NDCG@10 over the stale model and learner CPU per event: replay 0.2 of full-length sequences +0.0037 at 1.17 ms; replay_len 16 with replay 0.2 +0.0041 at 0.65 ms, 0.33 +0.0052 at 0.73 ms, 0.5 +0.0054 at 0.72 ms (a tie with 0.33, which draws fewer sequences)."
    lr: Optional[float] = 1e-4
    "Learning rate (null: trainer.lr); the optimizer starts fresh with trainer.warmup_steps, and continues across restarts. Lower than training's: at trainer.lr (3e-3) the learner fell below the stale model in bench/online.py's first window."
    commit_every_steps: int = 20
    "Commit (state.pt + the tables learnt since, stream offsets included) after this many steps; a kill loses at most the steps since, which are learnt again from the stream on restart."
    commit_every_s: float = 10.0
    "... or after this many seconds, whichever comes first."
    export_every_steps: int = 0
    "Publish an export (to --export) after this many steps (0: by time only); an export commits first."
    export_every_s: float = 30.0
    "... or after this many seconds of learning (0: by steps only); `serve` on that folder swaps it in."
    history_len: int = 16
    "The first of a user's new events in a step is predicted from at most this many earlier items (0: data.max_len; the sequence that trains the step's new events holds at most data.max_len + 1 items). A new event is one target at the end of its user's sequence, so that sequence's length is what the step pays for it. 16 against data.max_len (50) on bench/online.py's first two windows: the same gain over the stale model (+0.0055 against +0.0057 NDCG@10, replay 0.5 of full-length sequences) at four fifths of the CPU."
    replay_len: int = 16
    "A replayed sequence is a window of at most replay_len + 1 of the user's items (0: data.max_len), every position a target, the last predicted from replay_len items: at 16 rather than data.max_len (50) replay cost less than half and gained more (see replay_fraction)."
    num_threads: int = 1
    "Torch threads of `twotower learn` (0: trainer.num_threads, else torch's default). One by default: a step is a few hundred short sequences, too small for a second thread to pay (a profile of 2,560 events on bench/online.py's stale model: 1.9 ms of CPU per event at two threads, 1.4 at one)."
    dropout: Optional[float] = 0.0
    "The user tower's dropout while learning online (null: the model's model.user.dropout). Off by default: chosen on bench/online.py's first two windows, where it cost a fifth of the learner's CPU (57 s against 43 s at replay 0.2) and bought no NDCG (at replay 0.5 the learner beat the stale model by +0.0057 without it, +0.0047 with it)."
    max_steps: int = 0
    "Stop after this many steps (0: no limit)."
    idle_exit_s: float = 0.0
    "Stop after the stream has had no new record for this long (0: never: follow the stream until SIGTERM / SIGINT, which commit and stop)."

    def __post_init__(self) -> None:
        _check_positive("learn.step_events", self.step_events)
        if not 0.0 <= self.replay_fraction < 1.0:
            raise ValueError(f"learn.replay_fraction={self.replay_fraction}: expected 0 <= x < 1")
        if self.lr is not None:
            _check_positive("learn.lr", self.lr)
        _check_positive("learn.commit_every_steps", self.commit_every_steps)
        for key in ("step_wait_s", "commit_every_s", "export_every_s", "idle_exit_s"):
            _check_positive(f"learn.{key}", getattr(self, key), allow_zero=True)
        for key in ("export_every_steps", "max_steps", "num_threads", "history_len", "replay_len"):
            _check_positive(f"learn.{key}", getattr(self, key), allow_zero=True)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"learn.dropout={self.dropout}: expected 0 <= x < 1, or null for the model's own")


@dataclass
class EvalConfig:
    """Full-catalogue ranking (docs/data.md)."""

    filter_seen: bool = True
    "Exclude the user's input history from the ranking (the target never is)."
    ks: list[int] = field(default_factory=lambda: [10, 20])
    "Cut-offs of HR, NDCG and MRR."
    item_batch_size: int = 512
    "Items per batch when the catalogue is encoded."
    score_chunk_size: int = 65536
    "Items scored at once in full ranking: memory is data.eval_batch_size x this x 4 bytes, whatever the catalogue size."
    val_held_out: bool = True
    "Validation while training (early stopping, the best checkpoint) ranks the held-out items (split.cold_item_fraction) too, as serving ranks items added after training | false: leaves them out, so the choice follows the warm model alone, which a new-item head never moves. The reports (`evaluate`, the summary's valid, test and cold) rank them either way."

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError(f"eval.ks={list(self.ks)}: expected positive cut-offs")
        _check_positive("eval.item_batch_size", self.item_batch_size)
        _check_positive("eval.score_chunk_size", self.score_chunk_size)


@dataclass
class WandbConfig:
    """Weights & Biases; the CSV log is always written as well."""

    mode: str = "disabled"
    "online | offline (synced later with `wandb sync`) | disabled."
    project: str = "twotower"
    "W&B project."
    entity: Optional[str] = None
    "W&B entity (team or user); None: your default."
    group: Optional[str] = None
    "Run group (e.g. a sweep)."
    tags: list[str] = field(default_factory=list)
    "Run tags."

    def __post_init__(self) -> None:
        _check_choice("logger.wandb.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    "Weights & Biases settings."


@dataclass
class RunConfig:
    name: str = "default"
    "Run name (also the W&B run name)."
    dir: str = "runs/${run.name}"
    "Run folder: config.yaml, checkpoints/, metrics.csv, summary.json, plots."


@dataclass
class Config:
    """Everything one twotower command needs."""

    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    seed: int = 0
    "Seed of model initialisation, sampling and shuffling."
