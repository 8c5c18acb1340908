import tomllib
from pathlib import Path

import pytest

from app.config import PROFILES, ConfigError, env_name, load_settings, parse_overrides, seed_defaults, with_explicit_keys

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_table_is_the_seed_recipe():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]

    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    assert flat(table) == seed_defaults()


def test_seed_recipe_values():
    s = load_settings({})
    assert s.model.name == "ContactDoctor/Bio-Medical-Llama-3-8B"
    assert (s.model.quantization, s.model.gradient_checkpointing) == (4, True)
    lora = s.model.lora
    assert (lora.peft_lora_r, lora.peft_lora_alpha, lora.peft_lora_dropout, lora.use_dora) == (32, 64, 0.075, True)
    assert lora.target_modules == ["q_proj", "v_proj"]
    ta = s.train.training_arguments
    assert (ta.per_device_train_batch_size, ta.max_steps, ta.warmup_steps, ta.max_grad_norm) == (16, 6, 2, 1.0)
    assert (ta.optim, ta.lr_scheduler_type, ta.bf16, ta.tf32) == ("paged_adamw_8bit", "constant_with_warmup", True, True)
    assert (s.train.learning_rate_max, s.train.learning_rate_min, s.train.seq_length) == (5e-5, 1e-6, 512)
    assert (s.num_server_rounds, s.strategy.fraction_train, s.strategy.proximal_mu) == (10, 0.15, 1.0)
    assert (s.dataset.num_partitions, s.train.save_every_round) == (20, 5)


def test_tiny_profile_applies_and_explicit_overrides_win():
    s = load_settings({"profile": "tiny"})
    assert s.model.name == "tiny" and s.model.quantization == 0
    s = load_settings({"profile": "tiny", "train.seq-length": 32})
    assert s.train.seq_length == 32
    # A fused run config (pyproject defaults + profile key) still gets the profile's values.
    s = load_settings({**seed_defaults(), "profile": "tiny"})
    assert s.train.seq_length == PROFILES["tiny"]["train.seq-length"]


def test_an_explicit_key_at_exactly_the_seed_value_beats_the_profile():
    """`fedtune local up --profile tiny --run-config "train.learning-rate-max=5e-5 ..."`: the
    submitted run config is fused with pyproject's defaults by Flower, so the app sees the seed
    values; the keys the user chose travel in `explicit-keys`, and the profile leaves them."""
    from app.deploy.launcher import build_run_config

    submitted = build_run_config("tiny", 2, None, Path("results"), "train.learning-rate-max=5e-5 train.learning-rate-min=1e-6")
    assert submitted["explicit-keys"] == "num-server-rounds,results.dir,train.learning-rate-max,train.learning-rate-min"
    fused = {**seed_defaults(), **submitted}  # what the ServerApp and ClientApps receive
    s = load_settings(fused)
    assert (s.train.learning_rate_max, s.train.learning_rate_min) == (5e-5, 1e-6)
    assert s.model.name == "tiny" and s.train.seq_length == PROFILES["tiny"]["train.seq-length"]  # the rest is tiny
    # Without the marker (plain `flwr run`), seed values are indistinguishable from defaults.
    assert load_settings({**seed_defaults(), "profile": "tiny", "train.learning-rate-max": 5e-5}).train.learning_rate_max == 0.1
    assert with_explicit_keys({"profile": "tiny"})["explicit-keys"] == ""


def test_environment_override_at_the_seed_value_beats_the_profile(monkeypatch):
    monkeypatch.setenv(env_name("train.learning-rate-max"), "5e-05")
    monkeypatch.setenv(env_name("train.learning-rate-min"), "1e-06")
    s = load_settings({**seed_defaults(), "profile": "tiny"})
    assert (s.train.learning_rate_max, s.train.learning_rate_min, s.model.name) == (5e-5, 1e-6, "tiny")


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"train.seq-lenght": 1}, "unknown config key(s) 'train.seq-lenght'"),
        ({"model.quantization": 3}, "'model.quantization': Input should be 0, 4 or 8"),
        ({"train.seq-length": "long"}, "'train.seq-length': Input should be a valid integer"),
        ({"strategy.fraction-train": 1.5}, "'strategy.fraction-train': Input should be less than or equal to 1"),
        ({"profile": "huge"}, "'profile': 'huge' is not one of"),
        ({"comm.format": "int4"}, "'comm.format': Input should be 'float32', 'bfloat16', 'int8-block64' or 'int8-block256'"),
        ({"train.learning-rate-min": 1.0}, "train.learning-rate-min (1.0) must be <= train.learning-rate-max"),
    ],
)
def test_bad_values_name_the_key_and_allowed_values(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings(overrides)
    assert fragment in str(info.value)


def test_unknown_key_error_lists_allowed_keys():
    with pytest.raises(ConfigError, match="allowed keys: .*train.seq-length"):
        load_settings({"nope": 1})


def test_environment_overrides_run_config(monkeypatch):
    monkeypatch.setenv(env_name("trainer.resident"), "false")
    assert env_name("trainer.resident") == "FEDTUNE_TRAINER__RESIDENT"
    assert load_settings({"trainer.resident": True}).trainer.resident is False
    monkeypatch.setenv(env_name("train.training-arguments.max-steps"), "zero")
    with pytest.raises(ConfigError, match=r"max-steps' \(from \$FEDTUNE_TRAIN__TRAINING_ARGUMENTS__MAX_STEPS\)"):
        load_settings({})


def test_parse_overrides_reads_toml_scalars():
    assert parse_overrides('num-server-rounds=3 profile=tiny comm.format="bfloat16" trainer.resident=false x=1.5') == {
        "num-server-rounds": 3, "profile": "tiny", "comm.format": "bfloat16", "trainer.resident": False, "x": 1.5,
    }
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides("lonely")
