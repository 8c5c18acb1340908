"""GPU use while a round trains: NVML (nvidia-ml-py) sampled in a background thread.

The resident trainer wraps `RoundWorker.train` in a `GpuMonitor`; the samples become the
client metrics `gpu-mem-peak-bytes`, `gpu-mem-mean-bytes`, `gpu-util-mean` (percent) and
`gpu-samples`. Memory is the device's used memory as NVML reports it (every process on the
GPU, as `nvidia-smi` shows), so a GPU shared by several SuperNodes shows their sum: what an
operator needs to see an idle or overloaded GPU. Without NVML or a visible GPU it records
nothing and `metrics()` is empty; `status` says why.
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
        self.status = f"sampling GPU(s) {','.join(map(str, indices))}"
        return True

    def _sample(self) -> None:
        used = util = 0
        for handle in self._handles:
            used += self._used_memory(handle)
            util += int(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        self.memory.append(used)
        if len(self.memory) > 1:  # NVML's utilisation covers the period before a reading: the first is pre-round idle
            self.utilisation.append(util // len(self._handles))

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
