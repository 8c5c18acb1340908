"""Differential privacy (issue 27 item 3): the noise's calibration and source, the accountant
against a published value, and the ServerApp's central path through the real `main` with an
in-memory grid: noise of the calibrated size on the aggregate, epsilon in metrics.jsonl, the
summary and the report, and the configurations it refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

import app.client_app as client_app
from app import comm, server_app
from app.aggregation.bounds import recipe_norm_bound
from app.config import ConfigError, load_settings
from app.privacy.accountant import PrivacyLedger
from app.privacy.central import RoundPrivacy
from app.privacy.dp import SystemNormal, add_gaussian, guaranteed_noise_multiplier, node_noise_std, sum_noise_std
from app.results.checkpoint import RUN_STATE, load_adapter_tensors
from app.results.report import load_run, render_html, render_markdown
from app.server_app import resumed_releases
from app.training.data import known_partition_size
from fake_grid import FAKE_STEP, InMemoryGrid, fake_client, metrics_of, run_main, task_identity, tiny_config  # noqa: F401 (fixtures)

THREE = [f"supernode-{i}" for i in range(3)]
SEED_PARAMETERS = 13_795_328  # the seed adapter's values (DoRA r=32 on q/v of Llama-3-8B)
SEED_VALUES = 6_900_000  # about the seed adapter's 27.6 MB in float32
HIDDEN = 512  # the test adapter's width: 17,408 values, enough to measure the noise's std to ~1 %


def dp_sites(tmp_path: Path, **extra) -> dict:
    return tiny_config(tmp_path, **{"dataset.num-partitions": 3, "strategy.fraction-train": 1.0, "comm.format": "float32",
                                    "strategy.update-norm-bound": 1.0, "privacy.noise-multiplier": 0.5, **extra})


@pytest.fixture
def wide_init(monkeypatch):
    """Every node answers query.init with the same fresh DoRA adapter (r=8 on q/v, HIDDEN wide)."""
    state = {}
    for module in ("q_proj", "v_proj"):
        prefix = f"base_model.model.model.layers.0.self_attn.{module}"
        state[f"{prefix}.lora_A.weight"] = np.full((8, HIDDEN), 0.5, np.float32)
        state[f"{prefix}.lora_B.weight"] = np.zeros((HIDDEN, 8), np.float32)
        state[f"{prefix}.lora_magnitude_vector"] = np.ones(HIDDEN, np.float32)

    def initial_adapter(msg, context):
        arrays, wire = comm.encode(state, "float32", comm.WEIGHTS)
        return Message(RecordDict({"arrays": arrays, "wire": wire}), reply_to=msg)

    monkeypatch.setattr(client_app, "initial_adapter", initial_adapter)
    return state


# --- the noise ---------------------------------------------------------------------------------

def test_noise_of_the_seed_recipe_has_the_calibrated_std():
    """At the seed's scales (bound at lr 5e-5 over 13.8 M parameters, W = a flashcards partition,
    z = 1), add_gaussian over ~6.9 M values measures the std sum_noise_std computes, mean 0."""
    bound = recipe_norm_bound(6, 5e-5, SEED_PARAMETERS)
    weight = known_partition_size("medalpaca/medical_meadow_medical_flashcards", "", 20)
    std = sum_noise_std(1.0, bound, weight)
    assert std == pytest.approx(1.0 * bound * weight) and 2.2 < bound < 2.3 and weight > 1000
    noised = add_gaussian({"w": np.zeros(SEED_VALUES, np.float32)}, std, SystemNormal())["w"]
    assert noised.dtype == np.float32 and noised.shape == (SEED_VALUES,)
    assert np.std(noised) == pytest.approx(std, rel=2e-3)  # the estimate's sd: 1 / sqrt(2 x 6.9 M) = 0.03 %
    assert abs(np.mean(noised)) < 5 * std / math.sqrt(SEED_VALUES)
    # Gaussian, not just the right variance: the mass within 1 and 2 std.
    assert np.mean(np.abs(noised) < std) == pytest.approx(0.6827, abs=2e-3)
    assert np.mean(np.abs(noised) < 2 * std) == pytest.approx(0.9545, abs=2e-3)


def test_noise_comes_from_the_system_csprng_not_a_seed():
    np.random.seed(42)
    first = SystemNormal().normal(0.0, 1.0, (1000,))
    np.random.seed(42)
    second = SystemNormal().normal(0.0, 1.0, (1000,))
    assert np.all(np.isfinite(first)) and not np.array_equal(first, second)
    assert SystemNormal().normal(3.0, 0.0, (2, 3)).tolist() == [[3.0] * 3] * 2


@pytest.mark.parametrize(("min_nodes", "guaranteed"), [(3, 3), (3, 2), (16, 12)])
def test_shares_add_up_to_the_guaranteed_noise(min_nodes, guaranteed):
    """The secure path: each node adds node_noise_std; the sum of `guaranteed` shares carries
    guaranteed_noise_multiplier x W x C, z itself when every share counted on arrives."""
    z, bound, weight = 1.0, 2.24, 1698
    share = node_noise_std(z, bound, weight, min_nodes)
    total = sum(SystemNormal().normal(0.0, share, (200_000,)) for _ in range(guaranteed))
    effective = guaranteed_noise_multiplier(z, min_nodes, guaranteed)
    assert np.std(total) == pytest.approx(effective * bound * weight, rel=1e-2)
    assert (effective == z) == (guaranteed == min_nodes)


# --- the accountant ----------------------------------------------------------------------------

def test_epsilon_matches_the_published_value_for_the_gaussian_mechanism():
    """dp-accounting's own documented example (dp_accounting/rdp/rdp_privacy_accountant_test.py,
    test_compute_epsilon_delta_gaussian, v0.6.0): noise multiplier 4.530877117 gives exactly
    (1, 1e-6)-DP for one release. One accounted round at that multiplier must say epsilon = 1."""
    assert PrivacyLedger(1e-6).spend(4.530877117) == pytest.approx(1.0, abs=1e-4)


def test_epsilon_of_the_seed_recipe_with_and_without_noise():
    """10 rounds at z = 1 and delta = 1e-5, no amplification: 19.05 (the figure README quotes)."""
    ledger = PrivacyLedger(1e-5)
    epsilons = [ledger.spend(1.0) for _ in range(10)]
    assert epsilons == sorted(epsilons) and epsilons[-1] == pytest.approx(19.05, abs=0.01)
    assert PrivacyLedger(1e-5).epsilon() == 0.0
    assert PrivacyLedger(1e-5, [1.0, 0.0]).epsilon() == math.inf  # one round without noise: no guarantee


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.3, 20.0), min_size=1, max_size=12), st.floats(1e-9, 0.1))
def test_composition_of_gaussian_rounds(multipliers, delta):
    """Gaussian releases compose like one Gaussian of multiplier (sum z^-2)^-1/2 (RDP is additive);
    the order of rounds does not matter and one more round never lowers epsilon."""
    ledger = PrivacyLedger(delta, multipliers)
    single = PrivacyLedger(delta, [sum(z**-2 for z in multipliers) ** -0.5])
    assert ledger.epsilon() == pytest.approx(single.epsilon(), rel=1e-6)
    assert PrivacyLedger(delta, multipliers[::-1]).epsilon() == pytest.approx(ledger.epsilon(), rel=1e-9)
    before = ledger.epsilon()
    assert ledger.spend(multipliers[0]) >= before


def test_a_checkpoint_without_a_ledger_counts_as_unprotected():
    assert resumed_releases({"privacy_releases": [0.5, 0.5]}, 2) == [0.5, 0.5]
    assert resumed_releases({"round": 2}, 2) == [0.0]  # its rounds may have gone out un-noised
    with pytest.raises(ValueError, match="noise multipliers must be >= 0"):
        PrivacyLedger(1e-5, [-1.0])


# --- the configuration -------------------------------------------------------------------------

def test_a_median_bound_is_refused_with_privacy_in_one_line():
    with pytest.raises(ConfigError) as error:
        load_settings({"privacy.noise-multiplier": 1.0, "strategy.update-norm-median-multiple": 2.0})
    lines = str(error.value).splitlines()
    assert len(lines) == 2 and "strategy.update-norm-median-multiple" in lines[1] and "privacy.noise-multiplier" in lines[1]
    load_settings({"privacy.noise-multiplier": 1.0})  # the recipe's bound, data-independent: fine
    load_settings({"strategy.update-norm-median-multiple": 2.0})  # no privacy: fine


def test_privacy_without_a_weight_cap_starts_nothing(tmp_path, wide_init):
    config = dp_sites(tmp_path, **{"dataset.path": str(tmp_path / "own.jsonl"), "num-server-rounds": 1})
    pushed = []

    class Recording(InMemoryGrid):
        def push_messages(self, messages):
            pushed.extend(messages)
            return super().push_messages(messages)

    with pytest.raises(ConfigError, match=r"^privacy.noise-multiplier=0.5 needs a bound on each node's weight: set strategy.max-num-examples"):
        run_main(Recording(THREE, config, fake_client), run_id=1)
    assert pushed == []  # no node was asked anything, not even for the initial adapter
    run = run_main(InMemoryGrid(THREE, dict(config, **{"strategy.max-num-examples": 30}), fake_client), run_id=2)
    [record] = metrics_of(run)
    assert record["status"] == "aggregated" and record["dp_max_weight"] == 30


# --- the central path through the real ServerApp -------------------------------------------------

def _noise_free_step(record: dict) -> float:
    """The round's example-weighted mean of the fake clients' clipped updates (one value everywhere)."""
    clients = record["clients"]
    total = sum(c["num_examples"] for c in clients)
    return sum(c["num_examples"] * c["update_scale"] * FAKE_STEP * c["partition_id"] for c in clients) / total


def test_the_serverapp_adds_the_calibrated_noise_and_records_epsilon(tmp_path, wide_init):
    run = run_main(InMemoryGrid(THREE, dp_sites(tmp_path, **{"num-server-rounds": 1}), fake_client), run_id=3)
    [record] = metrics_of(run)
    weight = known_partition_size("tiny", "", 3)
    total = sum(c["num_examples"] for c in record["clients"])
    assert record["status"] == "aggregated" and record["norm_bound"] == 1.0 and record["dp_max_weight"] == weight
    assert record["dp_sum_noise_std"] == pytest.approx(0.5 * 1.0 * weight) and record["dp_noise_std"] == pytest.approx(0.5 * weight / total)

    final = load_adapter_tensors(run / "peft_1")
    step = _noise_free_step(record)
    noise = np.concatenate([(final[k].astype(np.float64) - wide_init[k] - step).ravel() for k in final])
    assert np.std(noise) == pytest.approx(record["dp_noise_std"], rel=0.04)  # 17,408 draws: sd of the estimate 0.5 %
    assert abs(np.mean(noise)) < 5 * record["dp_noise_std"] / math.sqrt(noise.size)
    # Bounded: a chi tail bound, P(norm > std (sqrt(n) + 8)) < exp(-32). The noise is far larger
    # than the norm bound (1.0), and the round still aggregated: the bound is checked before it.
    assert np.linalg.norm(noise) < record["dp_noise_std"] * (math.sqrt(noise.size) + 8)
    assert np.linalg.norm(noise) > 10 * record["norm_bound"]

    assert record["dp_epsilon"] == pytest.approx(PrivacyLedger(1e-5).spend(0.5)) and record["dp_delta"] == 1e-5
    assert record["dp_spent"] is True and record["dp_releases"] == 1 and record["dp_noise_multiplier"] == 0.5
    summary = json.loads((run / "summary.json").read_text())["privacy"]
    assert summary["epsilon"] == record["dp_epsilon"] and summary["rounds_accounted"] == 1 and "no amplification" in summary["sampling"]
    assert json.loads((run / "peft_1" / RUN_STATE).read_text())["privacy_releases"] == [0.5]
    data = load_run(run)
    assert f"differential privacy: epsilon {record['dp_epsilon']:.3g} at delta 1e-05 after round 1" in render_markdown(data)
    assert "Privacy spent (node level)" in render_html(data)


def test_the_noise_is_not_the_run_seed(tmp_path, wide_init):
    """Two runs with the same seed sample the same nodes and train alike, and still differ by their noise."""
    runs = [run_main(InMemoryGrid(THREE, dp_sites(tmp_path / str(i), **{"num-server-rounds": 1}), fake_client), run_id=4) for i in range(2)]
    first, second = (load_adapter_tensors(r / "peft_1") for r in runs)
    assert [c["partition_id"] for c in metrics_of(runs[0])[0]["clients"]] == [c["partition_id"] for c in metrics_of(runs[1])[0]["clients"]]
    assert not any(np.array_equal(first[k], second[k]) for k in first)


def test_a_refused_aggregate_spends_and_a_skipped_round_does_not(tmp_path, wide_init, monkeypatch):
    real = server_app.apply_mean_update

    def corrupt_round_2(master, updates, weights):
        new = real(master, updates, weights)
        if corrupt_round_2.calls == 0:  # round 1 aggregates nothing
            new[next(iter(new))][0] = np.inf
        corrupt_round_2.calls += 1
        return new

    corrupt_round_2.calls = 0
    monkeypatch.setattr(server_app, "apply_mean_update", corrupt_round_2)
    silent_round_1 = lambda name, server_round, attempt: "drop" if server_round == 1 else None  # noqa: E731
    config = dp_sites(tmp_path, **{"num-server-rounds": 3, "strategy.on-too-few-replies": "skip", "strategy.max-skipped-fraction": 1.0})
    run = run_main(InMemoryGrid(THREE, config, fake_client, silent_round_1), run_id=5)
    skipped, refused, aggregated = metrics_of(run)
    assert skipped["status"] == "skipped" and "min-replies" in skipped["skip_reason"] and skipped["dp_spent"] is False
    assert skipped["dp_releases"] == 0 and skipped["dp_epsilon"] == 0.0
    assert refused["status"] == "skipped" and "aggregate refused" in refused["skip_reason"]
    assert refused["dp_spent"] is True and refused["dp_releases"] == 1 and "dp_noise_std" not in refused
    assert aggregated["dp_releases"] == 2 and aggregated["dp_epsilon"] == pytest.approx(PrivacyLedger(1e-5, [0.5]).spend(0.5))
    assert json.loads((run / "summary.json").read_text())["privacy"]["rounds_accounted"] == 2


def test_without_privacy_nothing_is_added(tmp_path, wide_init):
    run = run_main(InMemoryGrid(THREE, dp_sites(tmp_path, **{"num-server-rounds": 1, "privacy.noise-multiplier": 0.0}), fake_client), run_id=6)
    [record] = metrics_of(run)
    final = load_adapter_tensors(run / "peft_1")
    step = _noise_free_step(record)
    assert all(np.allclose(final[k], wide_init[k] + step, rtol=0, atol=1e-6) for k in final)
    assert not any(key.startswith("dp_") for key in record)
    assert json.loads((run / "summary.json").read_text())["privacy"]["epsilon"] is None


def test_the_secure_path_accounts_with_its_guaranteed_shares():
    """Under secure aggregation the ServerApp adds no noise; it accounts the round with the noise
    of the shares certain to be in the sum and records how many that was."""
    privacy = RoundPrivacy(load_settings({"privacy.noise-multiplier": 1.0}), max_weight=1698)
    fields = privacy.spend(guaranteed_noise_multiplier(1.0, 3, 2), guaranteed_shares=2)
    assert fields["dp_noise_shares"] == 2 and fields["dp_noise_multiplier"] == pytest.approx(math.sqrt(2 / 3))
    assert fields["dp_epsilon"] == pytest.approx(PrivacyLedger(1e-5, [math.sqrt(2 / 3)]).epsilon())
    assert fields["dp_epsilon"] > PrivacyLedger(1e-5, [1.0]).epsilon()  # a lost share costs privacy
    assert privacy.summary()["rounds_accounted"] == 1


def test_a_resumed_run_continues_the_ledger(tmp_path, wide_init):
    """Rounds 1-2 before a crash and 3-4 after it: the resumed run's epsilon is four rounds'."""
    config = dp_sites(tmp_path, **{"num-server-rounds": 4})
    crashed_grid = InMemoryGrid(THREE, config, fake_client)
    crashed_grid.crash_at_round = 3
    with pytest.raises(KeyboardInterrupt):
        run_main(crashed_grid, run_id=7)
    resumed = run_main(InMemoryGrid(THREE, dict(config, **{"resume-from": str(tmp_path / "run-7" / "peft_2")}), fake_client, id_base=9000), run_id=8)
    records = metrics_of(resumed)
    assert [r["dp_releases"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["dp_epsilon"] == pytest.approx(PrivacyLedger(1e-5, [0.5] * 4).epsilon())
    assert json.loads((resumed / "summary.json").read_text())["privacy"]["rounds_accounted"] == 4


def test_the_console_line_shows_epsilon(tmp_path, wide_init):
    from app.deploy.launcher import _round_line

    run = run_main(InMemoryGrid(THREE, dp_sites(tmp_path, **{"num-server-rounds": 1}), fake_client), run_id=9)
    [record] = metrics_of(run)
    assert _round_line(record, run / "metrics.jsonl").endswith(f"  epsilon {record['dp_epsilon']:.3g} (delta 1e-05)")
    assert _round_line({**record, "dp_epsilon": None}, run / "metrics.jsonl").endswith("  epsilon: no guarantee")
    assert "epsilon" not in _round_line({k: v for k, v in record.items() if not k.startswith("dp_")}, run / "metrics.jsonl")


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=12), st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple), max_size=5),
       st.one_of(st.just(0.0), st.floats(1e-3, 1e3)))
def test_noise_keeps_every_tensor_s_name_shape_and_dtype(shapes, std):
    arrays = {name: np.full(shape, 0.25, np.float32) for name, shape in shapes.items()}
    noised = add_gaussian(arrays, std, SystemNormal())
    assert noised.keys() == arrays.keys()
    for name, value in noised.items():
        assert value.shape == arrays[name].shape and value.dtype == np.float32 and np.isfinite(value).all()
        assert np.array_equal(value, arrays[name]) == (std == 0 or value.size == 0)
