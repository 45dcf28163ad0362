"""The experiment configuration as frozen dataclasses: the one place that defines fields and defaults.

``configs/common.py`` turns ``Experiment()`` into an ml_collections ConfigDict (so launches can
override fields with ``--config.optim.lr=...``); ``from_dict`` turns the final ConfigDict back into
these dataclasses at the edge. Library code only ever sees the dataclasses. Unknown fields are
errors that name the field and the known ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model: a family and preset from ``lora_jax.models``, or a Hugging Face checkpoint."""

    family: str = "gpt2"  # 'gpt2' | 'llama'
    preset: str = "tiny"
    overrides: str = ""  # 'd_model=256,n_layer=6': preset fields to change
    scan_layers: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # with remat: a jax.checkpoint_policies name
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    hf_path: str = ""  # a Hugging Face checkpoint directory (config.json + model.safetensors)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Training and evaluation data: the built-in task suite, local text / JSONL files, or a
    classification kind ('sentences', 'images'); ``lora_jax.data.kinds`` says what each reads."""

    kind: str = "tasks"  # 'tasks' | 'jsonl' | 'text' (LM); 'sentences' | 'images' (classification)
    tasks: tuple[str, ...] = ("digits_reverse", "kv_recall")
    n_train_per_task: int = 4000
    n_eval_per_task: int = 256
    seq_len: int = 24
    tokenizer: str = "byte"  # 'byte' or a tokenizer.json path ('sentences': 'template' or BERT's)
    train_path: str = ""
    eval_path: str = ""
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Where the base parameters come from before adaptation.

    ``'pretrain'`` trains the model fully on ``pretrain_tasks`` once and caches the result under
    ``cache_dir`` keyed by everything that defines it; later runs reuse it. ``'init'`` uses a
    random initialisation; ``'hf'`` loads ``model.hf_path``.
    """

    source: str = "pretrain"  # 'pretrain' | 'init' | 'hf'
    pretrain_tasks: tuple[str, ...] = ("copy", "reverse", "sort", "add")
    pretrain_steps: int = 2000
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 32
    seed: int = 0  # the base's own seed, apart from the adapters' (a seed sweep reuses one base)
    cache_dir: str = ""  # default: $LORA_JAX_CACHE or ~/.cache/lora_jax


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The adapter spec (see ``lora_jax.LoraSpec``) beside the method; ignored by full
    fine-tuning. Method hyperparameters (init, LoRA+, MTL's tasks, LoSA's schedule) are the
    method's own: ``Experiment.method_args``."""

    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"  # preset name or comma-separated regexes
    exclude: str = ""
    dropout: float = 0.0
    rslora: bool = False
    modules_to_save: str = ""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # 'adamw' | 'sgd'
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "cosine"  # 'cosine' | 'constant'
    grad_clip: float = 1.0  # 0 disables clipping
    b1: float = 0.9
    b2: float = 0.999


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch_size: int = 32
    eval_every: int = 200
    eval_batch_size: int = 256
    log_every: int = 50
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # Run-time choices, not part of a run's identity (a resume may change them):
    async_checkpoints: bool = False  # orbax writes checkpoints in the background
    skip_nonfinite: bool = False  # skip a step with NaN/inf loss or gradients (else: stop)
    allow_data_change: bool = False  # resume even if a data file's content changed
    eval_generate: bool = False  # final eval also by real greedy decoding (accuracy_generated)
    microbatches: int = 1  # gradient accumulation: each batch in this many slices (same loss)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and multi-host runtime (see lora_jax.sharding, docs/scaling.md)."""

    preset: str = "dp"  # 'dp' | 'fsdp' | 'fsdp_tp': axis sizes and logical rules
    data: int = 0  # axis sizes: 0 = the preset's, -1 = infer from the device count
    fsdp: int = 0
    fsdp2: int = 0  # a second fsdp axis (size 1 unless set): weights split over fsdp x fsdp2
    tensor: int = 0
    rules: str = ""  # overrides of the preset's logical rules: 'mlp=tensor,vocab=none'
    max_replicated_mib: float = 1.0  # a fully replicated leaf above this under fsdp is an error
    num_devices: int = 0  # 0 = every device; N = the first N (e.g. a 1-device reference run)
    coordinator_address: str = ""  # multi-host: 'host:port'; 'auto' = JAX's cluster detection
    num_processes: int = 0  # 0 = from the environment / auto-detection
    process_id: int = -1  # -1 = from the environment / auto-detection
    init_timeout_s: int = 300  # how long to wait for the coordinator and the other processes


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """QLoRA: quantised frozen base kernels (see lora_jax.quant)."""

    kind: str = ""  # '' (none) | 'nf4' | 'int8'
    targets: str = "all-linear"  # kernels to quantise: preset or comma-separated regexes
    exclude: str = ""  # regexes of kernels never quantised
    block_size: int = 64  # NF4 block (QLoRA: 64); see lora_jax.quant.choose_blocking
    double_quant: bool = True  # NF4: 8-bit block constants, bitsandbytes' dynamic code (False: fp32)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: ``train_and_evaluate(Experiment, workdir)`` runs it.

    ``method`` is a registered adapter method (``lj.methods.known()``), built as
    ``lj.methods.from_config(method, method_args)``, or ``'full'``: full fine-tuning, the
    baseline, which trains every parameter and has no adapters.
    """

    method: str = "lora"  # a registered method ('lora', 'dora', 'mtl', ...) or 'full'
    method_args: dict[str, Any] = dataclasses.field(default_factory=dict)  # the method's kwargs
    seed: int = 0  # adapters' init, data order and dropout
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    base: BaseConfig = BaseConfig()
    adapter: AdapterConfig = AdapterConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    quant: QuantConfig = QuantConfig()

    @property
    def full_finetune(self) -> bool:
        """The baseline: every parameter trains, as itself (not an adapter)."""
        return self.method == FULL


FULL = "full"


def to_dict(cfg: Any) -> dict:
    """Dataclass -> nested dict of plain values (tuples stay tuples)."""
    return {f.name: (to_dict(v) if dataclasses.is_dataclass(v) else v)
            for f in dataclasses.fields(cfg) for v in [getattr(cfg, f.name)]}


def from_dict(cls: type, values: Mapping[str, Any], where: str = "config") -> Any:
    """Nested mapping -> dataclass ``cls``; unknown keys are errors naming the known fields."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in {where}; known: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}.{name}")
        elif typing.get_origin(hint) is dict:
            value = dict(value)
        elif typing.get_origin(hint) is tuple:
            # 'a,b' and ('a,b',) (what a --config.x=a,b flag gives) both mean ('a', 'b').
            items = [value] if isinstance(value, str) else value
            value = tuple(p for v in items for p in (v.split(",") if isinstance(v, str) else [v]))
        kwargs[name] = value
    return cls(**kwargs)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of dataclasses / plain values, for cache keys."""
    blob = json.dumps([to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
