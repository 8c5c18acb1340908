"""One typed configuration for the whole app, keyed like FlowerTune's `[tool.flwr.app.config]`.

Sources, lowest to highest precedence:
1. the field defaults below (the seed recipe, profile `bio-medical-llama3-8b`);
2. the selected profile's overrides (`PROFILES`), for keys the run config leaves at the seed value
   and that are not listed in `explicit-keys`;
3. the run config (pyproject defaults fused with `flwr run --run-config` overrides);
4. `FEDTUNE_*` environment variables of the process that reads the config
   (e.g. `FEDTUNE_TRAINER__RESIDENT=false`: dots become `__`, dashes `_`).

Everything is validated before any model or dataset loads; an error names the key and what is allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "FEDTUNE_"
# The GPU a node was given (`fedtune local up --gpus`, the compose GPU plan); unset on CPU-only
# nodes. Not a configuration key: a node given a GPU that CUDA cannot see refuses to train (app.training.model).
ASSIGNED_GPU_ENV = "FEDTUNE_GPU"
SEED_PROFILE = "bio-medical-llama3-8b"


class ConfigError(ValueError):
    """A configuration key has a wrong name, type or value."""


def _dashed(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", alias_generator=_dashed, populate_by_name=True, protected_namespaces=()
    )


class LoraSettings(_Section):
    peft_lora_r: int = Field(32, ge=1, le=1024)
    peft_lora_alpha: int = Field(64, ge=1)
    peft_lora_dropout: float = Field(0.075, ge=0.0, lt=1.0)
    peft_lora_target_modules: str = Field("q_proj,v_proj", min_length=1)
    use_dora: bool = True

    @property
    def target_modules(self) -> list[str]:
        return [m.strip() for m in self.peft_lora_target_modules.split(",") if m.strip()]


class ModelSettings(_Section):
    name: str = Field("ContactDoctor/Bio-Medical-Llama-3-8B", min_length=1)
    quantization: Literal[0, 4, 8] = 4
    gradient_checkpointing: bool = True
    lora: LoraSettings = LoraSettings()


class TrainingArguments(_Section):
    per_device_train_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_steps: int = Field(6, ge=1)
    warmup_steps: int = Field(2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    lr_scheduler_type: Literal["constant_with_warmup", "constant"] = "constant_with_warmup"
    optim: Literal["paged_adamw_8bit", "adamw_torch"] = "paged_adamw_8bit"
    bf16: bool = True
    tf32: bool = True
    # transformers' name: fused Triton RMSNorm/SwiGLU/RoPE (Liger) on CUDA; exact math, ~20 % faster steps.
    use_liger_kernel: bool = True


class TrainSettings(_Section):
    save_every_round: int = Field(5, ge=1)
    learning_rate_max: float = Field(5e-5, gt=0.0)
    learning_rate_min: float = Field(1e-6, ge=0.0)
    seq_length: int = Field(512, ge=8, le=32768)
    training_arguments: TrainingArguments = TrainingArguments()

    @model_validator(mode="after")
    def _lr_range(self) -> TrainSettings:
        if self.learning_rate_min > self.learning_rate_max:
            raise ValueError(
                f"train.learning-rate-min ({self.learning_rate_min}) must be <= "
                f"train.learning-rate-max ({self.learning_rate_max})"
            )
        return self


class StrategySettings(_Section):
    fraction_train: float = Field(0.15, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(0.0, ge=0.0, le=1.0)
    min_train_nodes: int = Field(1, ge=1)
    proximal_mu: float = Field(1.0, ge=0.0)
    # Seconds to wait for replies; the round aggregates what arrived by then.
    round_timeout: float = Field(3600.0, gt=0.0)
    # Fewer usable replies than this: never aggregate; retry the round (resampled) up to
    # max-retries times and then skip it, skip it at once, or fail the run.
    min_replies: int = Field(1, ge=1)
    on_too_few_replies: Literal["retry", "skip", "fail"] = "retry"
    max_retries: int = Field(2, ge=0)
    # A reply claiming more examples than this is refused, so no node takes all the weight.
    # 0: the partition size of a dataset the ServerApp knows (app/training/data.py), else no bound.
    max_num_examples: int = Field(0, ge=0)
    # Every update is clipped to this L2 norm before it counts (app/aggregation/bounds.py says why
    # honest updates stay within it). 0: derived each round from the recipe and the round's LR,
    # twice the farthest AdamW can move the adapter.
    update_norm_bound: float = Field(0.0, ge=0.0)
    # > 0: the bound is also at most this multiple of the round's median update norm (0 or >= 1).
    update_norm_median_multiple: float = Field(0.0, ge=0.0)
    # A run that aggregates no round, or skips more than this fraction of its rounds, ends failed.
    max_skipped_fraction: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _median_multiple(self) -> StrategySettings:
        if 0 < self.update_norm_median_multiple < 1:
            raise ValueError(f"strategy.update-norm-median-multiple ({self.update_norm_median_multiple}) must be 0 (off) or >= 1: below 1 it clips the median update")
        return self


LEADERBOARD_DATASET = "medalpaca/medical_meadow_medical_flashcards"


class DatasetSettings(_Section):
    name: str = Field(LEADERBOARD_DATASET, min_length=1)
    # A local json/jsonl/parquet file with the same columns, partitioned like the hub dataset.
    path: str = ""
    num_partitions: int = Field(20, ge=1)
    # Rows with a missing, empty or non-string `input`/`output`: drop them (counted) or fail.
    on_bad_rows: Literal["skip", "fail"] = "skip"


class TrainerSettings(_Section):
    # Keep the base model in a long-lived process (see app/training/trainer_service.py).
    resident: bool = True
    # Where that process runs: "node", one per SuperNode; "device", one per GPU (and one for the
    # CPU) serving every SuperNode placed on it in turn (app/training/device_trainer.py). The
    # launcher's GPU memory plan picks "device" when per-node residents do not fit.
    placement: Literal["node", "device"] = "node"
    # How long a ClientApp waits for its trainer to listen (a restarted one binds within seconds).
    connect_timeout: float = Field(5.0, gt=0.0)
    # A resident trainer that takes longer than load-seconds + steps x step-seconds for a round
    # counts as hung: its ClientApp trains in-process, its SuperNode restarts it
    # (app/training/trainer_service.py request_timeout). Measured (BENCHMARKS.md, 8B on one H200): 0.86 s
    # per step, 41 s for a warm-up round with the model load; 20 trainers share 8 GPUs.
    load_seconds: float = Field(900.0, gt=0.0)
    step_seconds: float = Field(60.0, gt=0.0)


class CommSettings(_Section):
    # Updates travel up in this format, weights down in bfloat16 (float32 for "float32"): see
    # app/comm.py. The default is the narrowest format whose effect on a round's update at the
    # seed's learning rates stays within 10 % of float32's (BENCHMARKS.md, communication).
    format: Literal["float32", "bfloat16", "int8-block64", "int8-block256"] = "int8-block256"
    # "per-array" (one Flower Array per tensor) exists for the transport benchmark only.
    layout: Literal["packed", "per-array"] = "packed"


class PrivacySettings(_Section):
    # SecAgg+ (app/privacy/): the ServerApp sees only the masked sum of a round's updates.
    secure_aggregation: bool = False
    # Gaussian noise on the aggregate, noise-multiplier x (the one-node sensitivity of the
    # weighted sum under the norm bound); 0 = no differential privacy. Added by the nodes in
    # shares under secure aggregation, by the ServerApp otherwise (app/privacy/dp.py).
    noise_multiplier: float = Field(0.0, ge=0.0, le=1e3)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)


class StaticDatasetSettings(_Section):
    name: str = Field(LEADERBOARD_DATASET, min_length=1)


class StaticSettings(_Section):
    # FlowerTune's [tool.flwr.app.config.static], kept as the template has it: the leaderboard's
    # fixed dataset. Nodes train on dataset.name; a run on another dataset is labelled as not
    # comparable with the leaderboard (app/results/report.py).
    dataset: StaticDatasetSettings = StaticDatasetSettings()


class ResultsSettings(_Section):
    dir: str = Field("results", min_length=1)


class Settings(BaseSettings):
    """The validated configuration of one federated run."""

    model_config = SettingsConfigDict(
        extra="forbid", alias_generator=_dashed, populate_by_name=True, protected_namespaces=()
    )

    profile: Literal["bio-medical-llama3-8b", "tiny"] = SEED_PROFILE
    seed: int = Field(42, ge=0)
    num_server_rounds: int = Field(10, ge=1)
    # A checkpoint directory `<results>/run-<id>/peft_N` to continue from, at round N+1.
    resume_from: str = ""
    # Comma-separated keys the submitter set explicitly (`fedtune` fills it in): the profile
    # never replaces them, even when their value equals the seed recipe's.
    explicit_keys: str = ""
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    strategy: StrategySettings = StrategySettings()
    dataset: DatasetSettings = DatasetSettings()
    trainer: TrainerSettings = TrainerSettings()
    comm: CommSettings = CommSettings()
    privacy: PrivacySettings = PrivacySettings()
    static: StaticSettings = StaticSettings()
    results: ResultsSettings = ResultsSettings()

    @model_validator(mode="after")
    def _fixed_bound_under_dp(self) -> Settings:
        # The noise is calibrated to the norm bound, so the bound must not depend on the updates:
        # a median of the round's norms would itself need a private estimate (adaptive clipping).
        if self.privacy.noise_multiplier > 0 and self.strategy.update_norm_median_multiple > 0:
            raise ValueError(
                f"strategy.update-norm-median-multiple ({self.strategy.update_norm_median_multiple}) must be 0 when "
                f"privacy.noise-multiplier ({self.privacy.noise_multiplier}) > 0: differential privacy needs a bound "
                "that does not depend on the updates (strategy.update-norm-bound, or 0 for the recipe's)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_FlatEnvSource(settings_cls), init_settings)

    @model_validator(mode="after")
    def _secure_aggregation_bound(self) -> Settings:
        if self.privacy.secure_aggregation and self.strategy.update_norm_median_multiple > 0:
            raise ValueError("strategy.update-norm-median-multiple must be 0 with privacy.secure-aggregation: the ServerApp sees no single update's norm")
        return self

    def flat(self) -> dict[str, Any]:
        """The configuration as flat FlowerTune-style keys (`train.seq-length` ...)."""
        return flatten(self.model_dump(by_alias=True))


# Profiles override the seed recipe; everything else is the same code path.
PROFILES: dict[str, dict[str, Any]] = {
    SEED_PROFILE: {},
    "tiny": {
        "model.name": "tiny",
        "model.quantization": 0,
        "model.gradient-checkpointing": False,
        "model.lora.peft-lora-r": 8,
        "model.lora.peft-lora-alpha": 16,
        "model.lora.peft-lora-dropout": 0.0,
        "train.seq-length": 64,
        # A random 64-wide base learns slowly through q/v adapters alone: large steps.
        "train.learning-rate-max": 1e-1,
        "train.learning-rate-min": 1e-2,
        "train.save-every-round": 1,
        "train.training-arguments.per-device-train-batch-size": 8,
        "train.training-arguments.max-steps": 4,
        "train.training-arguments.warmup-steps": 1,
        "train.training-arguments.optim": "adamw_torch",
        "train.training-arguments.bf16": False,
        "train.training-arguments.tf32": False,
        "strategy.proximal-mu": 0.01,
        "dataset.name": "tiny",
    },
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{key}': '{part}' is a value, not a section")
            node = child
        node[leaf] = value
    return tree


def seed_defaults() -> dict[str, Any]:
    """Flat defaults of the seed recipe; pyproject's [tool.flwr.app.config] must equal this."""
    # model_construct skips the sources (environment) and validation: pure field defaults.
    return flatten(Settings.model_construct().model_dump(by_alias=True))


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "__").replace("-", "_")


class _FlatEnvSource(PydanticBaseSettingsSource):
    """Reads `FEDTUNE_<KEY>` for every known key; values are parsed by pydantic."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads all keys at once

    def __call__(self) -> dict[str, Any]:
        found = {key: os.environ[env_name(key)] for key in seed_defaults() if env_name(key) in os.environ}
        return unflatten(found)


def resolve(run_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Flat keys after applying the profile. Flower fuses pyproject's defaults with the
    overrides before the app sees them, so a key at its seed value may be a default or a
    choice; `explicit-keys` (written by the submitter, who still knows) says which were chosen.
    The profile replaces only untouched seed values."""
    seed = seed_defaults()
    given = dict(run_config or {})
    unknown = sorted(set(given) - set(seed))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(repr(k) for k in unknown)}; "
            f"allowed keys: {', '.join(sorted(seed))}"
        )
    profile = given.get("profile", seed["profile"])
    if profile not in PROFILES:
        raise ConfigError(f"config key 'profile': {profile!r} is not one of {sorted(PROFILES)}")
    explicit = {k.strip() for k in str(given.get("explicit-keys", "")).split(",") if k.strip()}
    merged = dict(seed)
    merged.update(given)
    for key, value in PROFILES[profile].items():
        if key not in explicit and merged[key] == seed[key]:
            merged[key] = value
    return merged


def with_explicit_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config to submit: every key it sets is marked as chosen (see `resolve`)."""
    keys = sorted(set(config) - {"profile", "explicit-keys"})
    return {**config, "explicit-keys": ",".join(keys)}


def load_settings(run_config: Mapping[str, Any] | None = None) -> Settings:
    """Validate a (flat) run config; raise ConfigError naming every bad key."""
    flat = resolve(run_config)
    try:
        return Settings(**unflatten(flat))
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        if not error["loc"]:  # a rule across sections: its message names the keys
            lines.append(error["msg"].removeprefix("Value error, "))
            continue
        key = ".".join(str(part) for part in error["loc"])
        source = f" (from ${env_name(key)})" if env_name(key) in os.environ else ""
        got = error.get("input")
        got_text = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"config key '{key}'{source}: {error['msg']}{got_text}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse `k=v k2=v2` like `flwr run --run-config` (values are TOML scalars)."""
    import shlex
    import tomllib

    overrides: dict[str, Any] = {}
    for item in shlex.split(text):
        if "=" not in item:
            raise ConfigError(f"run-config item {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            overrides[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = raw  # bare words are strings, as in Flower
    return overrides
