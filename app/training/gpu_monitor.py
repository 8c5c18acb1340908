"""GPU use while a round trains: NVML (nvidia-ml-py) sampled in a background thread.

The resident trainer wraps `RoundWorker.train` in a `GpuMonitor`; the samples become the
client metrics `gpu-mem-peak-bytes`, `gpu-mem-mean-bytes`, `gpu-util-mean` (percent) and
`gpu-samples`. Memory is the device's used memory as NVML reports it (every process on the
GPU, as `nvidia-smi` shows), so a GPU shared by several SuperNodes shows their sum: what an
operator needs to see an idle or overloaded GPU. Without NVML or a visible GPU it records
nothing and `metrics()` is empty; `status` says why.

Utilisation is the mean of every sample the driver took in the window (NVML keeps one per
sample period, 200 ms on the H200, with a timestamp): readings of the current rate every 0.5 s
would see only the last period before each reading, 40 % of the window, and a 5 s round's mean
then moved by up to 10 points with where the readings fell. Drivers without the sample buffer
fall back to those readings.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

SAMPLE_SECONDS = 0.5


@dataclass
class GpuMonitor:
    interval: float = SAMPLE_SECONDS
    status: str = "not started"
    memory: list[int] = field(default_factory=list)
    utilisation: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list = []
        self._nvml = None
        self._last_seen: list[int] | None = None  # per GPU, the newest sample timestamp taken (us)

    def _open(self) -> bool:
        try:
            import pynvml  # nvidia-ml-py; imported here so CPU-only code paths never need it

            pynvml.nvmlInit()
        except Exception as exc:  # no library, no driver: a CPU host
            self.status = f"no GPU (NVML unavailable: {exc})"
            return False
        self._nvml = pynvml
        indices = _visible_indices(pynvml.nvmlDeviceGetCount())
        if not indices:
            self.status = "no GPU (none visible)"
            pynvml.nvmlShutdown()
            return False
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._last_seen = self._newest_samples()
        self.status = f"sampling GPU(s) {','.join(map(str, indices))}"
        return True

    def _newest_samples(self) -> list[int] | None:
        """Where each GPU's sample buffer ends now (samples before the window are left out), or
        None where the driver keeps no buffer."""
        nvml = self._nvml

        def buffer_end(handle) -> int:
            try:
                return max(s.timeStamp for s in nvml.nvmlDeviceGetSamples(handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, 0)[1])
            except nvml.NVMLError_NotFound:  # an empty buffer
                return 0

        try:
            return [buffer_end(h) for h in self._handles]
        except (AttributeError, nvml.NVMLError):  # no such call, or NOT_SUPPORTED
            return None

    def _sample(self) -> None:
        self.memory.append(sum(self._used_memory(handle) for handle in self._handles))
        if self._last_seen is not None:
            self._take_buffered_utilisation()
        elif len(self.memory) > 1:  # a reading covers the period before it: the first is pre-round idle
            rates = [int(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self._handles]
            self.utilisation.append(sum(rates) // len(rates))

    def _take_buffered_utilisation(self) -> None:
        """The samples each GPU's driver took since the last call (several GPUs sample at one rate,
        so the mean over all is the mean of the GPUs' means)."""
        nvml = self._nvml
        for i, handle in enumerate(self._handles):
            try:
                _, samples = nvml.nvmlDeviceGetSamples(handle, nvml.NVML_GPU_UTILIZATION_SAMPLES, self._last_seen[i])
            except nvml.NVMLError:  # NOT_FOUND: no new sample since last_seen
                samples = []
            new = [s for s in samples if s.timeStamp > self._last_seen[i]]
            if new:
                self._last_seen[i] = max(s.timeStamp for s in new)
            self.utilisation.extend(int(s.sampleValue.uiVal) for s in new)

    def _used_memory(self, handle) -> int:
        """NVML's v2 memory info, which leaves the driver's reserved memory out, as nvidia-smi's
        memory.used does (v1 counted ~600 MiB more on the H200); v1 where the driver lacks v2."""
        nvml = self._nvml
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2).used)
        except (AttributeError, TypeError, nvml.NVMLError):
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval):
                break

    def __enter__(self) -> GpuMonitor:
        if self._open():
            self._thread = threading.Thread(target=self._loop, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._last_seen is not None:
                self._take_buffered_utilisation()  # the samples since the last tick, up to the window's end
            self._nvml.nvmlShutdown()

    def metrics(self) -> dict[str, float]:
        if not self.memory:
            return {}
        return {
            "gpu-mem-peak-bytes": float(max(self.memory)),
            "gpu-mem-mean-bytes": float(sum(self.memory) / len(self.memory)),
            "gpu-util-mean": float(sum(self.utilisation) / len(self.utilisation)) if self.utilisation else 0.0,
            "gpu-samples": float(len(self.memory)),
        }


def _visible_indices(count: int) -> list[int]:
    """NVML indices of the GPUs this process may use: CUDA_VISIBLE_DEVICES as integers (how the
    launcher pins a node), else every device NVML sees (in a container: the ones it was given)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(e.isdigit() for e in entries):
        return list(range(count)) if entries else []
    return [int(e) for e in entries if int(e) < count]
