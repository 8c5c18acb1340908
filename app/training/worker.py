"""A client's work for one message, shared by the in-process ClientApp and the resident trainer.

`RoundWorker` keeps the base model, tokenizer and tokenized partitions between calls, so a
resident process pays for them once; in a fresh ClientApp process it is simply used once. In a
`flwr run .` simulation one Ray worker process runs the ClientApp for many simulated nodes in
turn: it keeps one model and each node's partition (app/client_app.py's `IN_PROCESS`).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.config import Settings, load_settings
from app.training.gpu_monitor import GpuMonitor
from app.node.read_policy import check_run_reads

log = logging.getLogger(__name__)

# Lines of the node's log that `fedtune local up` shows as progress (loading a model takes minutes).
MODEL_LOG_PREFIX = "fedtune-model "


@dataclass(frozen=True)
class NodeData:
    partition_id: int
    num_partitions: int
    data_path: str = ""

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], settings: Settings) -> NodeData:
        try:
            partition_id = int(node_config["partition-id"])
        except KeyError:
            raise ValueError("node config has no 'partition-id' (start the SuperNode with --node-config \"partition-id=I num-partitions=N\")") from None
        num_partitions = int(node_config.get("num-partitions", settings.dataset.num_partitions))
        if num_partitions != settings.dataset.num_partitions:
            raise ValueError(
                f"node config num-partitions={num_partitions} disagrees with the run's "
                f"dataset.num-partitions={settings.dataset.num_partitions} (a `flwr run .` simulation has one "
                f"partition per simulated SuperNode: --federation-config \"num-supernodes={settings.dataset.num_partitions}\")"
            )
        return cls(partition_id, num_partitions, str(node_config.get("data-path", "")))


@dataclass
class TrainRequest:
    run_config: dict[str, Any]
    node: NodeData
    server_round: int
    lr: float
    proximal_mu: float


class RoundWorker:
    def __init__(self) -> None:
        self._model_key: tuple | None = None
        self._model = None
        self._tokenizer = None
        # (examples, skipped rows) per partition: a simulation worker serves many nodes in turn.
        self._partitions: dict[tuple, tuple[list, int]] = {}
        self._pristine = False
        self.model_load_seconds = 0.0

    def _ensure_model(self, settings: Settings):
        from app.training.model import build_peft_model, load_tokenizer

        key = (settings.model.model_dump_json(), settings.seed, settings.train.training_arguments.use_liger_kernel)
        if key != self._model_key:
            self._model = None  # free the old one before loading the next
            print(f"{MODEL_LOG_PREFIX}loading {settings.model.name}", file=sys.stderr, flush=True)
            started = time.perf_counter()
            self._tokenizer = load_tokenizer(settings.model.name)
            self._model = build_peft_model(
                settings.model, seed=settings.seed, use_fused_kernels=settings.train.training_arguments.use_liger_kernel
            )
            self.model_load_seconds = time.perf_counter() - started
            print(f"{MODEL_LOG_PREFIX}loaded {settings.model.name} in {self.model_load_seconds:.1f} s", file=sys.stderr, flush=True)
            _release_cached_memory()  # loading's transient buffers
            self._model_key = key
            self._pristine = True
        return self._model

    def _ensure_examples(self, settings: Settings, node: NodeData):
        from app.training.data import build_examples, load_partition

        key = (settings.dataset.model_dump_json(), settings.model.name, settings.train.seq_length, node)
        if key not in self._partitions:
            if any(k[:3] != key[:3] for k in self._partitions):
                self._partitions.clear()  # another dataset or tokenizer: the old ones are stale
            rows, skipped = load_partition(
                settings.dataset.name, settings.dataset.path, node.partition_id, node.num_partitions, node.data_path,
                settings.dataset.on_bad_rows,
            )
            self._partitions[key] = (build_examples(rows, self._tokenizer, settings.train.seq_length), skipped)
        return self._partitions[key]

    def initial_adapter(self, run_config: dict[str, Any]) -> dict[str, np.ndarray]:
        """The adapter right after its seeded initialisation (DoRA's magnitude needs the base weights)."""
        from app.training.model import adapter_state

        settings = load_settings(run_config)
        check_run_reads(settings)
        if not self._pristine:
            self._model_key = None  # the resident model has trained since: rebuild it
        return _to_numpy(adapter_state(self._ensure_model(settings)))

    def train(self, request: TrainRequest, global_adapter: dict[str, np.ndarray], release_memory: bool = True) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """One client round. `release_memory=False` keeps the activations' cached GPU memory: a
        resident trainer gives it back itself (`release_memory()`), after its reply is sent."""
        import torch

        from app.training.data import round_batches
        from app.training.model import adapter_state, load_adapter_state
        from app.training.train import train_round

        started, turn_start = time.perf_counter(), time.time()
        settings = load_settings(request.run_config)
        check_run_reads(settings)
        model = self._ensure_model(settings)
        examples, skipped_rows = self._ensure_examples(settings, request.node)
        load_adapter_state(model, {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in global_adapter.items()})
        round_seed = settings.seed * 1_000_003 + request.server_round * 1_009 + request.node.partition_id
        torch.manual_seed(round_seed)  # dropout: same seed, same result, resident or not
        args = settings.train.training_arguments
        batches = round_batches(
            examples,
            batch_size=args.per_device_train_batch_size,
            steps=args.max_steps * args.gradient_accumulation_steps,
            seed=round_seed,
            pad_token_id=self._tokenizer.pad_token_id,
        )
        self._pristine = False
        train_start = time.time()  # epoch seconds, node clock: the report aligns them with the server's
        with GpuMonitor() as gpu:
            result = train_round(model, batches, args=args, lr=request.lr, proximal_mu=request.proximal_mu)
        train_end = time.time()
        metrics = {
            "train-loss": result.train_loss,
            "proximal-term": result.proximal,
            "num-examples": float(len(examples)),
            "skipped-rows": float(skipped_rows),
            "train-seconds": result.train_seconds,
            "client-round-seconds": time.perf_counter() - started,
            "model-load-seconds": self.model_load_seconds,
            "tokens": float(result.tokens),
            "steady-step-seconds": _steady(result.step_seconds),
            "t-turn-start": turn_start,
            "t-train-start": train_start,
            "t-train-end": train_end,
            **gpu.metrics(),
        }
        if torch.cuda.is_available():
            metrics["peak-gpu-bytes"] = float(torch.cuda.max_memory_allocated())
        self.model_load_seconds = 0.0  # reported once, by the round that paid for it
        adapter = _to_numpy(adapter_state(model))
        if release_memory:
            _release_cached_memory()
        metrics["t-turn-end"] = time.time()
        return adapter, metrics


    def release_memory(self) -> None:
        _release_cached_memory()


def _release_cached_memory() -> None:
    """Give the round's activations back to the GPU: a resident node idles at its model's size,
    so other nodes sharing the GPU can train (the memory plan in app/deploy/gpu_plan.py counts on it)."""
    import gc

    import torch

    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def _to_numpy(state) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in state.items()}


def _steady(step_seconds: list[float]) -> float:
    """Median step time after the first (warm-up) step."""
    steady = sorted(step_seconds[1:] or step_seconds)
    return steady[len(steady) // 2]
