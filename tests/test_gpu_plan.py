"""The pre-start GPU memory plan (app/deploy/gpu_plan.py), on CPU with fake nvidia-smi figures."""

import subprocess
import types

import pytest

from app.deploy import gpu_plan, launcher
from app.config import load_settings
from app.training.model import LLAMA3_8B_SHAPE

GIB = 2**30


def fake_smi(*gpus: tuple[str, int]):
    """nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.free replies (MiB)."""
    text = "".join(f"{i}, GPU-{i:0>8}-aaaa, NVIDIA H100 80GB HBM3, 81559, {free}\n" for i, free in gpus)

    def runner(cmd, **kwargs):
        assert cmd[0] == "nvidia-smi"
        return subprocess.CompletedProcess(cmd, 0, text, "")

    return runner


H100_FREE_MIB = 81079  # an empty H100 80GB as nvidia-smi reports it


def test_seed_shape_matches_model_module():
    for key, value in LLAMA3_8B_SHAPE.items():
        if key in gpu_plan.LLAMA3_8B_CONFIG:
            assert gpu_plan.LLAMA3_8B_CONFIG[key] == value


def test_parameter_counts_of_llama3_8b():
    counts = gpu_plan.parameter_counts(gpu_plan.LLAMA3_8B_CONFIG)
    assert counts["linear"] + counts["embed"] + counts["norm"] == 8_030_261_248  # Llama-3-8B's parameter count
    assert gpu_plan.adapter_parameters(gpu_plan.LLAMA3_8B_CONFIG, 32, ["q_proj", "v_proj"], True) == 13_795_328


def test_resident_footprint_is_close_to_the_measured_one():
    # Measured on an H100 (BENCHMARKS.md, issue 7): an idle resident 4-bit 8B trainer holds 5.7-5.8 GiB.
    footprint = gpu_plan.resident_footprint_bytes(gpu_plan.LLAMA3_8B_CONFIG, 4, 13_795_328)
    assert 5.8 * GIB < footprint < 7.5 * GIB
    assert gpu_plan.resident_footprint_bytes(gpu_plan.LLAMA3_8B_CONFIG, 0) > 2.3 * footprint  # bf16 linear layers: 4x


def test_train_extra_scales_with_tokens_and_checkpointing():
    cfg = gpu_plan.LLAMA3_8B_CONFIG
    seed = gpu_plan.train_extra_bytes(cfg, 16, 512, True)
    assert gpu_plan.train_extra_bytes(cfg, 8, 512, True) == pytest.approx(seed / 2, rel=1e-6)
    assert gpu_plan.train_extra_bytes(cfg, 16, 512, False) > 4 * seed


def test_clients_per_round_as_flower_samples():
    assert gpu_plan.clients_per_round(20, 0.15, 1) == 3
    assert gpu_plan.clients_per_round(3, 0.15, 1) == 1
    assert gpu_plan.clients_per_round(4, 0.75, 3) == 3
    assert gpu_plan.clients_per_round(2, 0.15, 3) == 2


def test_twenty_resident_8b_models_do_not_fit_one_h100():
    settings = load_settings({})
    refusal = gpu_plan.preflight(settings, 20, ["0"], runner=fake_smi(("0", H100_FREE_MIB)))
    assert refusal is not None
    assert "GPU 0" in refusal and "20 resident model(s)" in refusal and "79.2 GiB free" in refusal
    assert "trainer.resident=false" in refusal and "fits" in refusal  # non-resident: 3 models at a time
    assert "more --gpus" in refusal


def test_twenty_nodes_over_eight_h100s_fit(capsys):
    settings = load_settings({})
    gpus = [str(i) for i in range(8)]
    assert gpu_plan.preflight(settings, 20, gpus, runner=fake_smi(*[(g, H100_FREE_MIB) for g in gpus])) is None
    printed = capsys.readouterr().out
    assert "GPU 0 (NVIDIA H100 80GB HBM3): 3 node(s), up to 3 training at once" in printed
    assert "GPU 7 (NVIDIA H100 80GB HBM3): 2 node(s), up to 2 training at once" in printed


def test_need_counts_nodes_on_each_gpu_and_concurrent_trainers():
    settings = load_settings({})
    plan = gpu_plan.make_plan(settings, 20, ["0", "1"], gpu_plan.parse_query_gpus("0, GPU-0, H100, 81559, 81079\n1, GPU-1, H100, 81559, 1000\n"))
    assert [g.nodes for g in plan.gpus] == [list(range(0, 20, 2)), list(range(1, 20, 2))]
    for g in plan.gpus:
        assert g.concurrent == 3
        assert g.need_bytes == 10 * plan.footprint_bytes + 3 * plan.train_extra_bytes
    assert not plan.gpus[1].fits
    assert plan.alternative is not None and not plan.alternative.resident
    assert plan.alternative.gpus[0].need_bytes == 3 * (plan.footprint_bytes + plan.train_extra_bytes)


def test_refusal_names_the_gpu_that_is_short():
    settings = load_settings({"strategy.fraction-train": 1.0})
    runner = fake_smi(("0", H100_FREE_MIB), ("1", 20_000))
    refusal = gpu_plan.preflight(settings, 4, ["0", "1"], runner=runner)
    assert refusal is not None and refusal.startswith("the run does not fit in GPU memory: GPU 1 ")
    assert "19.5 GiB free" in refusal


def test_non_resident_mode_plans_only_training_clients():
    settings = load_settings({"trainer.resident": False})
    assert gpu_plan.preflight(settings, 20, ["0"], runner=fake_smi(("0", H100_FREE_MIB))) is None
    small = gpu_plan.preflight(settings, 20, ["0"], runner=fake_smi(("0", 30_000)))
    assert small is not None and "strategy.fraction-train" in small


def test_unknown_gpu_and_missing_nvidia_smi(capsys):
    settings = load_settings({})
    assert "not found by nvidia-smi" in gpu_plan.preflight(settings, 2, ["3"], runner=fake_smi(("0", H100_FREE_MIB)))

    def broken(cmd, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    assert gpu_plan.preflight(settings, 20, ["0"], runner=broken) is None
    assert "free memory unknown" in capsys.readouterr().out


def test_uuid_entries_match(capsys):
    settings = load_settings({})
    runner = fake_smi(("0", H100_FREE_MIB))
    assert gpu_plan.preflight(settings, 2, ["GPU-00000000-aaaa"], runner=runner) is None
    assert gpu_plan.preflight(settings, 2, ["GPU-00000000"], runner=runner) is None  # a UUID prefix


def test_off_switch(monkeypatch):
    monkeypatch.setenv("FEDTUNE_GPU_PLAN", "off")
    assert gpu_plan.preflight(load_settings({}), 20, ["0"], runner=fake_smi(("0", 1000))) is None


def test_local_model_config_is_read(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, '
                                          '"num_attention_heads": 4, "vocab_size": 1000, "tie_word_embeddings": true}')
    config = gpu_plan.model_config(str(tmp_path))
    assert gpu_plan.parameter_counts(config) == {"linear": 2 * (4 * 64 * 64 + 3 * 64 * 128), "embed": 64_000, "norm": 5 * 64}
    assert gpu_plan.model_config(str(tmp_path / "nowhere")) is None


def test_launcher_refuses_before_starting_anything(tmp_path, monkeypatch, capsys):
    """`fedtune local up --supernodes 20 --gpus 0` on one H100: exit 2, no process, no files."""
    started = []
    monkeypatch.setattr(gpu_plan, "query_gpus", lambda runner=None: gpu_plan.parse_query_gpus(
        f"0, GPU-0, NVIDIA H100 80GB HBM3, 81559, {H100_FREE_MIB}\n"))
    monkeypatch.setattr(launcher.Federation, "start", lambda self, *a, **k: started.append(a))
    args = types.SimpleNamespace(
        profile="bio-medical-llama3-8b", rounds=3, data=None, results=str(tmp_path / "results"), run_config="trainer.placement=node",
        supernodes=20, gpus="0", insecure=True, connect_timeout=5.0, resume_from="",
    )
    assert launcher.local_up(args) == 2
    err = capsys.readouterr().err
    assert "does not fit in GPU memory: GPU 0" in err and "trainer.resident=false" in err and "trainer.placement=device" in err
    assert started == [] and not (tmp_path / "results").exists()


def test_launcher_takes_device_placement_when_the_plan_chooses_it(tmp_path, monkeypatch, capsys):
    """No placement given: 20 seed nodes on one H100 launch with device placement, the run says so."""
    monkeypatch.setattr(gpu_plan, "query_gpus", lambda runner=None: gpu_plan.parse_query_gpus(
        f"0, GPU-0, NVIDIA H100 80GB HBM3, 81559, {H100_FREE_MIB}\n"))
    args = types.SimpleNamespace(profile="bio-medical-llama3-8b", rounds=3, data=None, results=str(tmp_path / "results"),
                                 run_config="", supernodes=20, gpus="0", resume_from="")
    run_config, settings = launcher.check_local_up(args)
    assert settings.trainer.placement == "device" and run_config["trainer.placement"] == "device"
    assert "trainer.placement" in run_config["explicit-keys"].split(",")  # the profile cannot undo the choice
    assert "using trainer.placement=device instead" in capsys.readouterr().out
    trainers = launcher.DeviceTrainers.issue(settings, run_config, 20, ["0", "1"])
    try:
        assert trainers.devices == ["0", "1"] and trainers.names() == ["trainer-gpu0", "trainer-gpu1"]
        assert trainers.node_args(3) == ["--trainer-socket", str(trainers.socket("1")), "--trainer-token",
                                         str(trainers.directory("1") / "token-3")]
        from app.training.node_tokens import NodeRegistry, read_token

        registry = NodeRegistry.load(trainers.directory("1") / "registry.json")
        assert registry.preload == run_config and len(registry.nodes) == 10
        token = read_token({"FEDTUNE_TRAINER_TOKEN": trainers.node_args(3)[-1]})
        assert registry.node_for(token).partition_id == 3
    finally:
        trainers.remove()
    assert not trainers.root.exists()


def test_describe_device_line_round_trip():
    line = gpu_plan.DEVICE_LOG_PREFIX + '{"pid": 7, "uuid": "GPU-1"}'
    assert gpu_plan.parse_device_lines(f"noise\n{line}\nmore") == [{"pid": 7, "uuid": "GPU-1"}]


def test_measured_shared_gpu_cases():
    """What ran on one H100 (issue 7): 3 resident nodes with 3 training fit (66.0 GiB measured);
    4 resident nodes with 3 training ran it out of memory mid-round: the plan must refuse that."""
    runner = fake_smi(("0", H100_FREE_MIB))
    three = load_settings({"strategy.fraction-train": 1.0})
    assert gpu_plan.preflight(three, 3, ["0"], runner=runner) is None
    plan = gpu_plan.make_plan(three, 3, ["0"], gpu_plan.parse_query_gpus(runner(["nvidia-smi"]).stdout))
    assert 66.0 * GIB < plan.gpus[0].need_bytes < 79 * GIB  # above what was measured, below the card
    four = load_settings({"strategy.fraction-train": 0.75, "strategy.min-train-nodes": 3})
    refusal = gpu_plan.preflight(four, 4, ["0"], runner=runner)
    assert refusal is not None and "4 resident model(s) with up to 3 training at once" in refusal
    assert "at most 3 resident node(s) per GPU" in refusal


def test_twenty_resident_nodes_over_four_h100s_refused_with_non_resident_offer():
    gpus = [str(i) for i in range(4)]
    refusal = gpu_plan.preflight(load_settings({}), 20, gpus, runner=fake_smi(*[(g, H100_FREE_MIB) for g in gpus]))
    assert refusal is not None and "5 resident model(s)" in refusal
    assert '"trainer.resident=false" (non-resident mode' in refusal and ">= 7)" in refusal


@pytest.mark.parametrize("count", [1, 2, 4, 8])
def test_twenty_nodes_plan_as_resident_with_device_placement_on_any_number_of_h100s(count, capsys):
    """Device placement: one base model and one training peak per GPU, however many nodes share it."""
    gpus = [str(i) for i in range(count)]
    runner = fake_smi(*[(g, H100_FREE_MIB) for g in gpus])
    settings = load_settings({"trainer.placement": "device"})
    assert gpu_plan.preflight(settings, 20, gpus, runner=runner) is None
    plan = gpu_plan.make_plan(settings, 20, gpus, gpu_plan.parse_query_gpus(runner(["nvidia-smi"]).stdout))
    assert plan.resident and plan.placement == "device" and len(plan.gpus) == count
    for g in plan.gpus:
        assert g.concurrent == 1 and len(g.nodes) in (20 // count, 20 // count + 1)
        assert g.need_bytes == plan.footprint_bytes + plan.train_extra_bytes
    assert 23 * GIB < plan.gpus[0].need_bytes < 26 * GIB  # 5.7 GiB measured idle + 17.5 GiB training, + margins
    assert "device trainers (one resident base model per GPU" in capsys.readouterr().out


@pytest.mark.parametrize("count, chosen", [(1, "device"), (2, "device"), (4, "device"), (8, "node")])
def test_the_plan_chooses_device_placement_when_per_node_residents_do_not_fit(count, chosen, capsys):
    gpus = [str(i) for i in range(count)]
    runner = fake_smi(*[(g, H100_FREE_MIB) for g in gpus])
    refused, placement = gpu_plan.choose_placement(load_settings({}), 20, gpus, True, runner=runner)
    assert refused is None and placement == chosen
    printed = capsys.readouterr().out
    if chosen == "device":
        assert f"GPU memory plan: {20 // count} resident per-node models on GPU 0 need" in printed
        assert "using trainer.placement=device instead" in printed
    else:  # 3 per-node residents per H100 fit: each node keeps its own trainer
        assert "using trainer.placement" not in printed and "3 node(s), up to 3 training at once" in printed


def test_an_explicit_node_placement_is_refused_with_the_device_offer():
    runner = fake_smi(("0", H100_FREE_MIB))
    refused, placement = gpu_plan.choose_placement(load_settings({}), 20, ["0"], False, runner=runner)
    assert placement == "node" and refused is not None
    assert '"trainer.placement=device" (a device trainer per GPU holds one base model for all its nodes; needs 24.' in refused
    assert "per GPU, fits)" in refused


def test_device_placement_that_does_not_fit_a_24_gb_card_is_refused():
    """One base plus one training peak of the seed recipe is ~24.3 GiB: a 24 GB card is short."""
    runner = fake_smi(("0", 23_000))  # MiB free on an idle 24 GB card
    refused, placement = gpu_plan.choose_placement(load_settings({}), 20, ["0"], True, runner=runner)
    assert placement == "node" and refused is not None
    assert "does not fit either" in refused
    settings = load_settings({"train.seq-length": 256})  # half the tokens per step: it fits
    refused, placement = gpu_plan.choose_placement(settings, 20, ["0"], True, runner=runner)
    assert refused is None and placement == "device"
