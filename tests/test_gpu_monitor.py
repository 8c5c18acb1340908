"""GPU sampling in the resident trainer: NVML through nvidia-ml-py, nothing on a CPU host."""

from __future__ import annotations

import sys
import time
import types

from app.training.gpu_monitor import GpuMonitor


def test_without_nvml_it_reports_no_gpu_and_no_metrics(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails, as on a host without the library
    with GpuMonitor(interval=0.01) as monitor:
        time.sleep(0.05)
    assert monitor.metrics() == {}
    assert monitor.status.startswith("no GPU")


def _fake_nvml(used: list[int], util: list[int], count: int = 2) -> types.ModuleType:
    state = {"calls": 0, "shutdown": False}
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: state.update(shutdown=True)
    nvml.NVMLError = type("NVMLError", (Exception,), {})
    nvml.nvmlDeviceGetCount = lambda: count
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i

    def memory(handle):
        state["calls"] += 1
        return types.SimpleNamespace(used=used[min(state["calls"] - 1, len(used) - 1)])

    nvml.nvmlDeviceGetMemoryInfo = memory
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=util[min(state["calls"] - 1, len(util) - 1)])
    nvml.state = state
    return nvml


def test_samples_the_visible_gpu_while_the_block_runs(monkeypatch):
    nvml = _fake_nvml(used=[1 * 2**30, 3 * 2**30, 2 * 2**30], util=[10, 90, 50])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with GpuMonitor(interval=0.01) as monitor:
        while len(monitor.memory) < 3:
            time.sleep(0.01)
    metrics = monitor.metrics()
    assert monitor.status == "sampling GPU(s) 1"
    assert metrics["gpu-mem-peak-bytes"] == 3 * 2**30
    assert metrics["gpu-samples"] == len(monitor.memory) >= 3
    assert 2**30 < metrics["gpu-mem-mean-bytes"] < 3 * 2**30
    assert 10 < metrics["gpu-util-mean"] < 90
    assert nvml.state["shutdown"]


def test_without_a_sample_buffer_utilisation_leaves_out_the_first_reading_which_describes_idle_time(monkeypatch):
    """On the H200 the mean came out 3-12 points under nvidia-smi's over the same window: NVML's
    utilisation is the busy share of the period before each reading, so the first is idle."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(used=[1, 1, 1], util=[0, 80, 80], count=1))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GpuMonitor(interval=0.01) as monitor:
        while len(monitor.memory) < 3:
            time.sleep(0.01)
    assert monitor.metrics()["gpu-util-mean"] == 80.0


def test_a_gpu_outside_the_visible_set_is_not_sampled(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([1], [1], count=1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with GpuMonitor(interval=0.01) as monitor:
        pass
    assert monitor.metrics() == {} and monitor.status == "no GPU (none visible)"


def test_a_round_reports_its_training_window_and_gpu_use_when_there_is_a_gpu(monkeypatch):
    import torch

    from app.training.worker import NodeData, RoundWorker, TrainRequest

    run_config = {"profile": "tiny", "dataset.num-partitions": 20}
    worker = RoundWorker()
    before = time.time()
    _, metrics = worker.train(TrainRequest(run_config, NodeData(3, 20), 1, 0.05, 0.01), worker.initial_adapter(run_config))
    assert before <= metrics["t-train-start"] < metrics["t-train-end"] <= time.time()
    assert metrics["t-train-end"] - metrics["t-train-start"] <= metrics["client-round-seconds"]
    gpu_keys = {"gpu-mem-peak-bytes", "gpu-mem-mean-bytes", "gpu-util-mean", "gpu-samples"}
    assert (gpu_keys <= set(metrics)) if torch.cuda.is_available() else not (gpu_keys & set(metrics))


def test_memory_leaves_out_what_the_driver_reserves_as_nvidia_smi_does(monkeypatch):
    """v1 memory info counted the driver's reserved memory (~600 MiB over nvidia-smi on the H200)."""
    nvml = _fake_nvml(used=[5 * 2**30], util=[50], count=1)
    nvml.nvmlMemory_v2 = 2
    nvml.nvmlDeviceGetMemoryInfo = lambda h, version=1: types.SimpleNamespace(used=(4 if version == 2 else 5) * 2**30)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GpuMonitor(interval=0.01) as monitor:
        while len(monitor.memory) < 2:
            time.sleep(0.01)
    assert monitor.metrics()["gpu-mem-peak-bytes"] == 4 * 2**30


def _fake_nvml_with_samples(buffer: list[tuple[int, int]]) -> types.ModuleType:
    """The driver's utilisation sample buffer: (timestamp us, percent), appended to by the test."""
    nvml = _fake_nvml(used=[1], util=[0], count=1)
    nvml.NVML_GPU_UTILIZATION_SAMPLES = 1
    nvml.NVMLError_NotFound = type("NVMLError_NotFound", (nvml.NVMLError,), {})

    def samples(handle, kind, last_seen):
        new = [types.SimpleNamespace(timeStamp=t, sampleValue=types.SimpleNamespace(uiVal=v)) for t, v in buffer if t > last_seen]
        if not new:
            raise nvml.NVMLError_NotFound()
        return 1, new

    nvml.nvmlDeviceGetSamples = samples
    nvml.nvmlDeviceGetUtilizationRates = lambda h: (_ for _ in ()).throw(AssertionError("the buffer is there: no readings"))
    return nvml


def test_utilisation_is_every_driver_sample_in_the_window_and_none_before_it(monkeypatch):
    """Readings every 0.5 s saw one 200 ms sample period in 2.5 (H200) and a 5 s round's mean
    moved by up to 10 points with where they fell; the driver's buffer holds them all."""
    buffer = [(1_000, 0), (1_200, 0)]  # idle before the round
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml_with_samples(buffer))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GpuMonitor(interval=0.01) as monitor:
        for stamp, value in ((1_400, 100), (1_600, 40), (1_800, 100)):
            buffer.append((stamp, value))
            time.sleep(0.03)
        buffer.append((2_000, 60))  # after the last tick: taken when the block ends
    assert monitor.utilisation == [100, 40, 100, 60]
    assert monitor.metrics()["gpu-util-mean"] == 75.0


def test_an_empty_sample_buffer_at_the_start_still_uses_the_buffer(monkeypatch):
    buffer: list[tuple[int, int]] = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml_with_samples(buffer))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GpuMonitor(interval=0.01) as monitor:
        buffer.append((5, 30))
        time.sleep(0.03)
    assert monitor.utilisation == [30]
