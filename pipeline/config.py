"""The run configuration: one typed tree of frozen dataclasses, loaded from YAML plus dotted overrides.

Every value is checked once, at start-up; a bad config fails with the full key path, the value and
what is allowed, before any stage runs. Each stage receives only the sections it reads, as a typed
view (`RunConfig.select(FinetuneConfig)`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline.lm_eval_tasks import HELDOUT_TASK

DEFAULT_MODEL = "models/tiny-python-docs"
"""The embedded default base model and tokenizer (a folder of the repository; relative to the current directory)."""


class ConfigError(ValueError):
    """A config problem a user can fix; the message lists every problem found."""


@dataclass(frozen=True)
class RunSection:
    name: str = "tiny"
    """Run name; the run directory is `<root>/<name>`."""
    root: str = "runs"
    """Folder that holds run directories (relative paths are taken from the current directory)."""
    seed: int = 0
    """Seed for data split, initialisation and sampling."""

    PLACEMENT: typing.ClassVar[tuple[str, ...]] = ("name", "root")
    """Where the run lives, not what it computes: left out of fingerprints, so a moved run directory resumes."""

    def problems(self) -> list[str]:
        out = []
        if not self.name or "/" in self.name:
            out.append(f"name: {self.name!r} must be a non-empty folder name without '/'")
        return out


@dataclass(frozen=True)
class ModelSection:
    path: str | None = DEFAULT_MODEL
    """Local `from_pretrained` directory (LLaMA/Mistral/Qwen2); the default is the small trained model in the
    repository. null: build a randomly initialised model from the fields below."""
    model_type: Literal["llama", "mistral", "qwen2"] = "llama"
    """Architecture of a model built from this config."""
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    """Fewer than num_heads gives grouped-query attention (GQA)."""
    intermediate_size: int = 128
    max_position_embeddings: int = 512
    vocab_size: int | None = None
    """Unset: the tokenizer's vocabulary size."""
    tie_word_embeddings: bool = False
    trust_remote_code: bool = False
    """Let transformers run Python code shipped with the checkpoint or tokenizer (`auto_map`); only for trusted ones."""

    def problems(self) -> list[str]:
        out = []
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            if getattr(self, name) < 1:
                out.append(f"{name}: {getattr(self, name)} must be >= 1")
        if self.num_heads >= 1 and self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads:
            out.append(f"num_heads: {self.num_heads} must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_heads >= 1 and self.hidden_size % self.num_heads:
            out.append(f"hidden_size: {self.hidden_size} must be a multiple of num_heads ({self.num_heads})")
        if self.vocab_size is not None and self.vocab_size < 1:
            out.append(f"vocab_size: {self.vocab_size} must be >= 1 or null")
        if self.path is not None and not Path(self.path).is_dir():
            out.append(f"path: {self.path!r} is not a directory; give a local from_pretrained directory or null")
        return out


@dataclass(frozen=True)
class DataSection:
    sources: tuple[str, ...] = ("data/python-docs.jsonl",)
    """Local .txt/.jsonl/.json/.parquet files or folders of them."""
    hub_name: str | None = None
    """A `datasets` hub name to load instead of `sources` (needs network or a local HF cache)."""
    hub_config: str | None = None
    hub_split: str = "train"
    format: Literal["text", "instruction"] = "text"
    """text: documents packed into seq_len blocks; instruction: Alpaca records or chat `messages`, loss on answers."""
    text_field: str = "text"
    """Field holding a document in .jsonl/.parquet text data."""
    text_unit: Literal["line", "paragraph", "document"] = "paragraph"
    """What one document is in a .txt file."""
    seq_len: int = 128
    validation_fraction: float = 0.05
    """Share of documents held out for validation (split before tokenization, seeded)."""
    num_proc: int = 2
    """Worker processes for tokenization."""

    def problems(self) -> list[str]:
        out = []
        if self.hub_name is None and not self.sources:
            out.append("sources: empty; name at least one file or folder, or set data.hub_name")
        if self.hub_name is None:
            for source in self.sources:
                if not Path(source).exists():
                    out.append(f"sources: {source!r} does not exist")
        if self.seq_len < 2:
            out.append(f"seq_len: {self.seq_len} must be >= 2")
        if not 0.0 < self.validation_fraction < 1.0:
            out.append(f"validation_fraction: {self.validation_fraction} must be in (0, 1)")
        if self.num_proc < 1:
            out.append(f"num_proc: {self.num_proc} must be >= 1")
        return out


@dataclass(frozen=True)
class TokenizerSection:
    path: str | None = DEFAULT_MODEL
    """A HF tokenizer directory or a SentencePiece .model file (default: the default model's). null: train
    SentencePiece BPE on the corpus."""
    vocab_size: int = 512
    """Vocabulary of a trained tokenizer (>= 300: byte fallback needs 256 byte pieces plus specials)."""
    train_sentences: int = 200_000
    """At most this many lines of the corpus feed tokenizer training."""

    def problems(self) -> list[str]:
        out = []
        if self.path is not None and not Path(self.path).exists():
            out.append(f"path: {self.path!r} does not exist; give a tokenizer directory, a .model file, or null")
        if self.path is None and self.vocab_size < 300:
            out.append(f"vocab_size: {self.vocab_size} must be >= 300 (byte fallback needs 259 reserved pieces)")
        return out


@dataclass(frozen=True)
class AptSection:
    adapter_targets: tuple[str, ...] = ("q_proj", "v_proj", "up_proj", "down_proj")
    """Projections that carry a low-rank adapter (every projection is masked either way)."""
    rank: int = 8
    """Initial adapter rank."""
    alpha: float = 16.0
    """Adapter scaling numerator: s = alpha / initial rank."""
    dropout: float = 0.0
    max_rank_multiplier: int = 8
    """An adapter grows to at most this times its initial rank."""
    grow_every: int = 15
    """Steps between rank-growth updates (0: never grow); each growth rebuilds the DeepSpeed engine. 15 suits the
    tiny run (80 steps, pruning window 0..40): growth early in the window (step 15) and near its end (30), so the
    grown ranks train through the rest of pruning and the 40 recovery steps. The first growth spends the whole
    `tuning_budget`; later ones use what compaction freed, and one with nothing to spend skips the rebuild. Real
    runs set it from their step count (configs/llama2-7b.yaml: 200)."""
    tuning_budget: float = 4.0
    """Adapter parameters may grow to this multiple of their initial count."""
    salience_momentum: float = 0.85
    """EMA momentum of block salience between pruning updates."""
    outlier_term: bool = True
    """Add sqrt(kurtosis) of a channel's activation to the apt criterion (APT's outlier-aware part); false scores
    by Σ|∂L/∂H|·Σ|H| alone (an ablation: the term does not grow with the tokens an update sums, the product does)."""
    distill: bool = True
    """Self-distillation from the model as pruning starts (KL at temperature 2 + hidden-state term); with
    compaction the teacher becomes its own frozen model before the first cut (docs/design.md §5)."""
    distill_weight: float = 0.5
    """mu in (1 - mu) * task loss + mu * distillation loss."""

    def problems(self) -> list[str]:
        out = []
        allowed = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        unknown = sorted(set(self.adapter_targets) - allowed)
        if unknown:
            out.append(f"adapter_targets: {unknown} unknown; allowed: {sorted(allowed)}")
        if self.rank < 1:
            out.append(f"rank: {self.rank} must be >= 1")
        if self.max_rank_multiplier < 1:
            out.append(f"max_rank_multiplier: {self.max_rank_multiplier} must be >= 1")
        if self.grow_every < 0:
            out.append(f"grow_every: {self.grow_every} must be >= 0")
        if self.tuning_budget < 1:
            out.append(f"tuning_budget: {self.tuning_budget} must be >= 1 (a multiple of the initial adapters)")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"dropout: {self.dropout} must be in [0, 1)")
        if not 0.0 <= self.salience_momentum < 1.0:
            out.append(f"salience_momentum: {self.salience_momentum} must be in [0, 1)")
        if not 0.0 <= self.distill_weight <= 1.0:
            out.append(f"distill_weight: {self.distill_weight} must be in [0, 1]")
        return out


@dataclass(frozen=True)
class PruningSection:
    target_remaining: float = 0.5
    """Fraction of parameters the final model keeps (0.5 = half the parameters)."""
    start_step: int = 0
    """First step of the pruning window (cubic schedule starts here)."""
    end_step: int = 40
    """Step at which the target is reached."""
    update_every: int = 5
    """Steps between salience all-reduces and mask searches inside the window."""
    mask_step: float = 0.1
    """alpha: how far a gradual mask moves toward its target per training step."""
    attention_mode: Literal["kv_group", "query_in_group"] = "kv_group"
    """kv_group: drop whole KV groups; query_in_group: keep KV heads, trim query heads evenly per group."""
    layout: Literal["uniform", "per_layer"] = "uniform"
    """uniform: same kept sizes in every layer (a plain config of the base's type); per_layer: sizes vary per
    layer (an `apt_llama` / `apt_mistral` / `apt_qwen2` config; the export carries its modeling code, so
    `from_pretrained(path, trust_remote_code=True)` loads it with transformers alone, and after `import
    pipeline` without remote code)."""
    round_to: int = 8
    """Kept neurons and hidden channels are multiples of this (1 disables)."""
    min_hidden: int = 16
    """Hidden channels that are never pruned."""
    compact: bool = True
    """Cut blocks whose mask and target reached 0 out of the training model (and its optimizer) mid-finetune, so
    later steps run on a smaller model. A block removed this way can never come back."""
    compact_min_fraction: float = 0.05
    """Compact only once at least this fraction of some block type (heads, KV heads, neurons, hidden) can go."""
    shape_search: Literal["measured", "global"] = "measured"
    """measured: rank each block type only within itself and pick the kept sizes among shape_candidates splits by
    calibration loss; global: one density list over all types (the ablation, docs/design.md §4)."""
    shape_candidates: int = 9
    """Candidate shapes per measured choice, at most 9 (splits of the removed parameters between hidden, attention
    and MLP; pipeline/apt/shapes.py SPLITS, in order)."""
    shape_batches: int = 2
    """Global calibration batches each candidate's loss is measured on (forward only) in a measured choice."""
    target_shape: tuple[int, ...] | None = None
    """Fixed final sizes [hidden, heads, kv_heads, intermediate] or [hidden, heads, kv_heads, intermediate, layers]
    (uniform layout); the run ends at exactly this shape, whose remaining fraction replaces target_remaining. With a
    layer count the layers of lowest block influence are cut once the widths reach their target."""
    criterion: Literal["apt", "taylor", "activation", "magnitude", "random"] = "apt"
    """What ranks the blocks (docs/design.md §3): apt: outlier-aware salience |∂L/∂H|·|H| + sqrt(kurtosis);
    taylor: |Σ H·∂L/∂H| per block (LLM-Pruner's first-order Taylor); activation: mean squared activation
    (Minitron); magnitude: Σw² of the base weights; random: a seeded random density per block. The adapters,
    distillation, rank growth, shape search and export are the same for every criterion."""
    schedule: Literal["gradual", "one_shot"] = "gradual"
    """gradual: the cubic schedule over [start_step, end_step] with masks moving mask_step per step (APT);
    one_shot: scores from the dense model on one_shot_batches calibration batches, the final masks fixed (and
    compacted) before step 0, every step spent recovering on the final structure (LLM-Pruner's and Minitron's
    recipes). The window fields are then unused."""
    one_shot_batches: int = 8
    """Global calibration batches (forward and backward, no step) the one-shot scores are summed over."""
    depth: Literal["off", "auto"] | int = "off"
    """Whole decoder layers as prunable units (measured shape search only): off: widths only; auto: each choice
    also weighs cutting the k layers of lowest block influence (k = 1, 2, ...; the rest of the budget on widths)
    against the width-only shapes, by loss; a number: the layers the final model keeps, reached along the
    schedule. A cut layer is masked whole, then taken out at the next compaction and left out of the export
    (docs/design.md §4, §6)."""
    per_layer_ranking: Literal["relative", "salience"] = "relative"
    """How the per_layer layout ranks a type's units across layers (unused in uniform): relative: each layer's scores
    divided by that layer's mean over its live units, so a unit competes by how it stands within its own layer;
    salience: by salience per parameter as it is (the ablation: salience runs ~50x smaller in late layers than in
    early ones, so it empties the late layers' MLPs; 17.5% worse on the study's model, docs/design.md §4)."""
    depth_unit: Literal["layer", "sublayer"] = "layer"
    """What depth auto cuts: layer: whole decoder layers; sublayer: a layer's attention or its MLP alone (both: the
    layer), ordered by each one's block influence. sublayer needs depth auto and layout per_layer (only the
    per-layer export can say that a layer has no attention or no MLP)."""
    salience_gradient: Literal["before_mask", "after_mask"] = "before_mask"
    """Which gradient the apt and taylor criteria use: before_mask: ∂L/∂H of the activation H the mask multiplies
    (a channel's score shrinks with its own mask as it fades); after_mask: ∂L/∂(m⊙H), the channel's score as if
    it were fully on, so a fading channel whose loss says it matters can return (docs/design.md §3)."""

    def problems(self) -> list[str]:
        out = []
        if self.one_shot_batches < 1:
            out.append(f"one_shot_batches: {self.one_shot_batches} must be >= 1")
        if not 1 <= self.shape_candidates <= 9:
            out.append(f"shape_candidates: {self.shape_candidates} must be in [1, 9]")
        if self.shape_batches < 1:
            out.append(f"shape_batches: {self.shape_batches} must be >= 1")
        out += self._target_shape_problems()
        out += self._depth_problems()
        if not 0.0 <= self.compact_min_fraction <= 1.0:
            out.append(f"compact_min_fraction: {self.compact_min_fraction} must be in [0, 1]")
        if not 0.0 < self.target_remaining <= 1.0:
            out.append(f"target_remaining: {self.target_remaining} must be in (0, 1]")
        if self.start_step < 0 or self.end_step <= self.start_step:
            out.append(f"end_step: {self.end_step} must be > start_step ({self.start_step}) >= 0")
        if self.update_every < 1:
            out.append(f"update_every: {self.update_every} must be >= 1")
        if not 0.0 < self.mask_step <= 1.0:
            out.append(f"mask_step: {self.mask_step} must be in (0, 1]")
        if self.round_to < 1:
            out.append(f"round_to: {self.round_to} must be >= 1")
        if self.min_hidden < 1:
            out.append(f"min_hidden: {self.min_hidden} must be >= 1")

        return out

    def _depth_problems(self) -> list[str]:
        """Layer cuts are chosen among measured candidates; whether a count fits the model is checked at preflight."""
        out = []
        if self.depth_unit == "sublayer" and (self.depth != "auto" or self.layout != "per_layer"):
            out.append(f"depth_unit: sublayer needs depth auto (got {self.depth!r}) and layout per_layer (got "
                       f"{self.layout!r}): a layer without attention or MLP exists only in the per-layer export")
        if self.depth == "off":
            return out
        if isinstance(self.depth, int) and self.depth < 1:
            out.append(f"depth: {self.depth} layers to keep must be >= 1 (or off / auto)")
        if self.shape_search != "measured":
            out.append(f"depth: {self.depth!r} needs shape_search measured (layer cuts are chosen by loss), got "
                       f"{self.shape_search!r}")
        if self.target_shape is not None:
            out.append(f"depth: {self.depth!r} with a target_shape: give the layer count as target_shape's fifth "
                       f"entry instead")
        return out

    @property
    def target_layers(self) -> int | None:
        """The layer count `target_shape` ends at, where it gives one (its fifth entry)."""
        return self.target_shape[4] if self.target_shape is not None and len(self.target_shape) == 5 else None

    @property
    def cuts_layers(self) -> bool:
        """Whether the run may cut whole layers (`depth`, or a `target_shape` with a layer count)."""
        return self.depth != "off" or self.target_layers is not None

    def _target_shape_problems(self) -> list[str]:
        """A target shape a LlamaConfig accepts; whether it fits the model is checked where the model is known."""
        if self.target_shape is None:
            return []
        if len(self.target_shape) not in (4, 5) or min(self.target_shape) < 1:
            return [f"target_shape: {list(self.target_shape)} must be four or five sizes >= 1: [hidden, heads, "
                    f"kv_heads, intermediate] and optionally layers"]
        hidden, heads, kv_heads = self.target_shape[:3]
        out = []
        if heads % kv_heads:
            out.append(f"target_shape: heads {heads} must be a multiple of kv_heads {kv_heads}")
        if hidden % heads:
            out.append(f"target_shape: hidden {hidden} must be a multiple of heads {heads} (LlamaConfig requires it)")
        if self.layout != "uniform":
            out.append(f"target_shape: needs layout uniform (one size per axis), got {self.layout!r}")
        return out


@dataclass(frozen=True)
class TrainSection:
    steps: int = 80
    """Optimizer steps of the finetune stage."""
    micro_batch_size: int = 4
    """Sequences per rank per forward."""
    grad_accum: int = 1
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 3
    grad_clip: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp32 unless asked, as DeepSpeed and the transformers Trainer do (CPU ranks have no bf16
    matrix units: fp32 is 3.7x as fast for the tiny demo). GPU configs set bf16 (configs/llama2-7b.yaml)."""
    checkpoint_every: int = 20
    """Steps between DeepSpeed checkpoints (one is always written at the end)."""
    eval_batches: int = 8
    """Validation batches for the perplexity at the end of finetune."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A micro-batch whose loss is inf/NaN on any rank: stop the stage, or skip that optimizer step (grad_accum 1)."""
    max_skipped_steps: int = 10
    """With nonfinite=skip: stop anyway after this many skipped steps (the run is diverging, not unlucky)."""

    def problems(self) -> list[str]:
        out = []
        if self.nonfinite == "skip" and self.grad_accum != 1:
            out.append(f"nonfinite: 'skip' needs grad_accum 1 (got {self.grad_accum}): DeepSpeed reduces gradients "
                       f"at the accumulation boundary, so one micro-batch cannot be dropped from a half-accumulated "
                       f"step; raise micro_batch_size instead, or use nonfinite: stop")
        if self.max_skipped_steps < 0:
            out.append(f"max_skipped_steps: {self.max_skipped_steps} must be >= 0")
        for name in ("steps", "micro_batch_size", "grad_accum", "checkpoint_every", "eval_batches"):
            if getattr(self, name) < 1:
                out.append(f"{name}: {getattr(self, name)} must be >= 1")
        if not self.lr > 0:
            out.append(f"lr: {self.lr} must be > 0")
        if self.warmup_steps < 0:
            out.append(f"warmup_steps: {self.warmup_steps} must be >= 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            out.append("weight_decay and grad_clip must be >= 0")
        return out


@dataclass(frozen=True)
class DeepSpeedSection:
    config: str = "ds_configs/zero2_cpu.json"
    """DeepSpeed JSON template (it sets the ZeRO stage); its "auto" fields are filled from the train section."""
    num_gpus: int = 2
    """Ranks per node: GPUs, or CPU processes where there is no GPU."""
    num_nodes: int = 1
    hostfile: str | None = None
    """DeepSpeed hostfile (`host slots=N` lines) for several nodes."""
    master_port: int = 29500
    launcher_args: tuple[str, ...] = ()
    """Extra arguments passed to the `deepspeed` launcher as they are."""
    timeout_minutes: float = 30.0
    """A collective that waits longer than this (a rank hung) fails the stage instead of blocking forever."""
    host_check_port: int = 22
    """Port the start-up check connects to on every hostfile host (ssh, which the launcher uses); 0 skips it."""

    PLACEMENT: typing.ClassVar[tuple[str, ...]] = (
        "num_gpus", "num_nodes", "hostfile", "master_port", "launcher_args", "timeout_minutes", "host_check_port")
    """Where and how the ranks run, not what they compute: left out of stage fingerprints, so a finetune
    checkpoint resumes on another number of ranks (the global batch is kept, see finetune)."""

    def problems(self) -> list[str]:
        out = []
        if not Path(self.config).is_file():
            out.append(f"config: {self.config!r} is not a file; see ds_configs/")
        if self.num_gpus < 1 or self.num_nodes < 1:
            out.append(f"num_gpus ({self.num_gpus}) and num_nodes ({self.num_nodes}) must be >= 1")
        if self.num_nodes > 1 and self.hostfile is None:
            out.append(f"hostfile: required when num_nodes is {self.num_nodes}")
        if self.hostfile is not None and not Path(self.hostfile).is_file():
            out.append(f"hostfile: {self.hostfile!r} is not a file")
        if not self.timeout_minutes > 0:
            out.append(f"timeout_minutes: {self.timeout_minutes} must be > 0")
        if not 1024 <= self.master_port <= 65535:
            out.append(f"master_port: {self.master_port} must be in [1024, 65535]")
        if not 0 <= self.host_check_port <= 65535:
            out.append(f"host_check_port: {self.host_check_port} must be in [0, 65535] (0 skips the check)")
        return out


@dataclass(frozen=True)
class SalienceSection:
    batches: int = 8
    """Global calibration batches (each rank reads train.micro_batch_size rows of each)."""

    def problems(self) -> list[str]:
        return [f"batches: {self.batches} must be >= 1"] if self.batches < 1 else []


@dataclass(frozen=True)
class EvalSection:
    batches: int = 8
    """Validation batches for perplexity."""
    batch_size: int = 4
    prompt_tokens: int = 16
    """Prompt length for the generation-speed measurement."""
    new_tokens: int = 32
    rounds: int = 7
    """Timing rounds after a warm-up; each times base and pruned once, in alternating order (the median counts)."""
    max_spread: float = 0.25
    """The speed-up is reported as unreliable when its interquartile range over the rounds exceeds this share
    of the median (a busy machine)."""
    lm_eval_tasks: tuple[str, ...] = (HELDOUT_TASK,)
    """lm-eval-harness tasks scored on base and export (empty: none). `apt_heldout`: rolling log-likelihood of
    the held-out documents, offline; hub tasks (hellaswag, arc_easy, ...) need their datasets cached or a network."""
    lm_eval_limit: int | None = 500
    """At most this many documents per lm-eval task (null: all); bounds the held-out task on a large corpus."""

    def problems(self) -> list[str]:
        out = [f"{name}: {getattr(self, name)} must be >= 1" for name in
               ("batches", "batch_size", "prompt_tokens", "new_tokens", "rounds") if getattr(self, name) < 1]
        if self.max_spread <= 0:
            out.append(f"max_spread: {self.max_spread} must be > 0")
        if self.lm_eval_limit is not None and self.lm_eval_limit < 1:
            out.append(f"lm_eval_limit: {self.lm_eval_limit} must be >= 1 or null")
        return out


@dataclass(frozen=True)
class TrackingSection:
    uri: str | None = None
    """MLflow tracking URI (a server for multi-node). Unset: an embedded SQLite store in the run directory."""
    experiment: str = "apt-pipeline"

    def problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class ExportSection:
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """Weight dtype of the exported checkpoint."""

    def problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    apt: AptSection = field(default_factory=AptSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    salience: SalienceSection = field(default_factory=SalienceSection)
    eval: EvalSection = field(default_factory=EvalSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    export: ExportSection = field(default_factory=ExportSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def fingerprint_sections(self, *sections: str) -> dict:
        """The named sections as plain dicts, without placement fields: what a stage's fingerprint covers."""
        out = {}
        for name in sections:
            section = getattr(self, name)
            placement = getattr(section, "PLACEMENT", ())
            out[name] = {key: value for key, value in dataclasses.asdict(section).items() if key not in placement}
        return out

    def select(self, view: type[StageView]) -> StageView:
        """The sections one stage may read, as that stage's typed view (`FinetuneConfig`, ...)."""
        return view(**{f.name: getattr(self, f.name) for f in dataclasses.fields(view)})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



# ---- per-stage views: the sections each stage reads, typed; they (and its inputs) make its fingerprint ----------


@dataclass(frozen=True)
class PrepConfig:
    data: DataSection
    tokenizer: TokenizerSection
    model: ModelSection
    run: RunSection


@dataclass(frozen=True)
class FinetuneConfig:
    run: RunSection
    model: ModelSection
    apt: AptSection
    pruning: PruningSection
    train: TrainSection
    deepspeed: DeepSpeedSection


@dataclass(frozen=True)
class SalienceConfig:
    run: RunSection
    model: ModelSection
    apt: AptSection
    pruning: PruningSection
    train: TrainSection
    deepspeed: DeepSpeedSection
    salience: SalienceSection


@dataclass(frozen=True)
class FinalizeConfig:
    model: ModelSection
    pruning: PruningSection


@dataclass(frozen=True)
class MergeConfig:
    model: ModelSection
    apt: AptSection
    pruning: PruningSection
    export: ExportSection


@dataclass(frozen=True)
class EvalConfig:
    model: ModelSection
    eval: EvalSection


StageView = typing.TypeVar("StageView", PrepConfig, FinetuneConfig, SalienceConfig, FinalizeConfig, MergeConfig,
                           EvalConfig)


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read YAML (or start from the defaults), apply `a.b=value` overrides, check everything once."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw)


def read_sections(path: str | Path, names: typing.Sequence[str]) -> dict[str, typing.Any]:
    """Typed sections of a config file as written (defaults filled in), without the checks that need its paths to
    exist: `apt-pipeline plan --config` reads a cluster's config on a laptop."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    sections, problems = {}, []
    for name in names:
        kwargs, section_problems = _convert_section(_SECTIONS[name], raw.get(name) or {})
        problems += [f"{name}.{p}" for p in section_problems]
        sections[name] = None if section_problems else _SECTIONS[name](**kwargs)
    if problems:
        raise ConfigError(f"{path}: invalid config:\n  " + "\n  ".join(problems))
    return sections


def apply_override(raw: dict, item: str) -> None:
    """Set `section.key=value` in a raw config dict; the value is read as YAML (`true`, `3`, `[a, b]`)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
    section = raw.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"override {item!r}: {parts[0]} is not a section")
    section[parts[1]] = yaml.safe_load(value)


def from_dict(raw: dict) -> RunConfig:
    """Build and check a RunConfig; every problem in every section is reported at once."""
    problems: list[str] = []
    sections = {}
    for section_field in dataclasses.fields(RunConfig):
        section_cls = _SECTIONS[section_field.name]
        values = raw.get(section_field.name) or {}
        if not isinstance(values, dict):
            problems.append(f"{section_field.name}: must be a mapping, got {values!r}")
            continue
        kwargs, section_problems = _convert_section(section_cls, values)
        problems += [f"{section_field.name}.{p}" for p in section_problems]
        if not section_problems:
            section = section_cls(**kwargs)
            problems += [f"{section_field.name}.{p}" for p in section.problems()]
            sections[section_field.name] = section
    data, model = sections.get("data"), sections.get("model")
    if data and model and model.path is None and data.seq_len > model.max_position_embeddings:
        problems.append(f"data.seq_len: {data.seq_len} exceeds model.max_position_embeddings "
                        f"({model.max_position_embeddings})")
    pruning, train = sections.get("pruning"), sections.get("train")
    if (pruning and train and pruning.schedule == "gradual"
            and train.steps < (needed := pruning.end_step + math.ceil(1 / pruning.mask_step))):
        problems.append(f"train.steps: {train.steps} leaves masks fractional; gradual masks need "
                        f"pruning.end_step + 1/pruning.mask_step = {needed} steps to reach exactly 0 or 1")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(RunConfig)})
    problems += [f"{name}: unknown section; known: {', '.join(_SECTIONS)}" for name in unknown]
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return RunConfig(**sections)


def _convert_section(cls: type, values: dict) -> tuple[dict, list[str]]:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    problems = [f"{key}: unknown key; known: {', '.join(sorted(known))}" for key in values if key not in known]
    kwargs = {}
    for key, value in values.items():
        if key in known:
            try:
                kwargs[key] = _coerce(value, hints[key])
            except TypeError as e:
                problems.append(f"{key}: {value!r} is not {e}")
    return kwargs, problems


def _coerce(value, hint):
    """Return `value` as type `hint`, or raise TypeError naming what was expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        expected = []
        for inner in (a for a in args if a is not type(None)):  # the first type that takes the value
            try:
                return _coerce(value, inner)
            except TypeError as e:
                expected.append(str(e))
        raise TypeError(" or ".join(expected))
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise TypeError(f"one of {list(args)}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise TypeError(f"a list of {args[0].__name__}")
        return tuple(_coerce(v, args[0]) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    raise TypeError(f"a {hint}")


_SECTIONS = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in dataclasses.fields(RunConfig)}


def dump(cfg: RunConfig) -> str:
    """The resolved config as YAML (tuples written as lists)."""
    return yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
