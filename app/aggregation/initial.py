"""The initial adapter, taken only when nodes agree on it: no single node chooses everyone's start.

The ServerApp never loads the base model, so nodes build the initial adapter (DoRA's magnitude
vectors are norms of the base weights). It asks up to INITIAL_ASK nodes at once and takes the
adapter as soon as two replies agree; each reply is first checked against the run's adapter
configuration (`check_adapter_layout`). Two nodes with the same base model and seed build the
same adapter: bit for bit on the same hardware; across GPU models the magnitude vectors may
differ in the last bits (INITIAL_AGREEMENT_TOLERANCE). With one node online its adapter is
taken alone, and the log says so.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping

import numpy as np
from flwr.app import Message

from app import comm
from app.aggregation.replies import error_reason, quote
from app.config import LoraSettings

State = Mapping[str, np.ndarray]

# How many nodes are asked at once: two agreeing replies decide, the third outvotes a hostile one.
INITIAL_ASK = 3
# Two adapters agree when every tensor's largest difference is at most this fraction of its
# largest value. lora_A is drawn from the seeded CPU generator (identical everywhere) and lora_B
# starts at zero; only the DoRA magnitude vectors are computed on each node's GPU, as row norms
# of the (dequantized) base weights, whose float32 reductions differ across GPU models by about
# 1e-6 relative. 1e-3 leaves room for other dequantization kernels and is far below any change
# that would matter to training (a round at the seed's learning rates moves them by ~3e-4).
INITIAL_AGREEMENT_TOLERANCE = 1e-3

KIND_A, KIND_B, KIND_MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_magnitude_vector"
TENSOR_NAME = re.compile(r"base_model\.model\.((?:\w+\.)*?(\w+))\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")


class InitialAdapterRejected(ValueError):
    """An initial adapter that does not fit the run's adapter configuration."""


def check_adapter_layout(state: State, lora: LoraSettings) -> None:
    """Tensor names and shapes must be those of a fresh LoRA/DoRA adapter of `lora`: only
    lora_A, lora_B (and, with DoRA, magnitude) tensors of the target modules; per module,
    lora_A (r, in), lora_B (out, r) all zero (PEFT's initialisation), magnitude (out,); the same
    shapes for the same module in every layer."""
    if not state:
        raise InitialAdapterRejected("no tensors")
    modules: dict[str, dict[str, tuple[int, ...]]] = defaultdict(dict)
    for name, value in state.items():
        match = TENSOR_NAME.fullmatch(name)
        if not match:
            raise InitialAdapterRejected(f"tensor {quote(name)!r} is not a LoRA/DoRA tensor of the form base_model.model.<module>.{KIND_A}")
        path, module, kind = match.groups()
        if module not in lora.target_modules:
            raise InitialAdapterRejected(f"tensor {quote(name)!r}: module {module!r} is not a target module ({lora.peft_lora_target_modules})")
        if kind == KIND_B and np.any(value):
            raise InitialAdapterRejected(f"tensor {quote(name)!r}: a fresh adapter's lora_B is zero")
        modules[path][kind] = tuple(value.shape)
    kinds = {KIND_A, KIND_B} | ({KIND_MAGNITUDE} if lora.use_dora else set())
    r = lora.peft_lora_r
    layouts: dict[str, dict[str, tuple[int, ...]]] = {}
    for path, shapes in modules.items():
        if set(shapes) != kinds:
            raise InitialAdapterRejected(f"module {quote(path)!r} has {sorted(shapes)}, expected {sorted(kinds)}")
        a, b = shapes[KIND_A], shapes[KIND_B]
        if len(a) != 2 or a[0] != r or len(b) != 2 or b[1] != r:
            raise InitialAdapterRejected(f"module {quote(path)!r}: lora_A {list(a)} and lora_B {list(b)}, expected (r, in) and (out, r) with r={r}")
        if lora.use_dora and shapes[KIND_MAGNITUDE] != (b[0],):
            raise InitialAdapterRejected(f"module {quote(path)!r}: magnitude {list(shapes[KIND_MAGNITUDE])}, expected [{b[0]}] (lora_B's rows)")
        role = re.sub(r"\.\d+\.", ".N.", path)  # the same module in every layer
        if layouts.setdefault(role, shapes) != shapes:
            raise InitialAdapterRejected(f"module {quote(path)!r}: shapes {shapes} differ from {layouts[role]} of the same module in another layer")
    if absent := sorted(set(lora.target_modules) - {TENSOR_NAME.fullmatch(n).group(2) for n in state}):
        raise InitialAdapterRejected(f"no tensors of target module(s) {absent}")


def agreement(a: State, b: State) -> str | None:
    """"exact" when two adapters are bit for bit equal, "within tolerance" when every tensor
    differs by at most INITIAL_AGREEMENT_TOLERANCE of its largest value, else None. Tensors are
    matched by name: their order is not the adapter's (a resident trainer's reply comes in any
    order, seen on `fedtune local up`)."""
    if set(a) != set(b) or any(a[k].shape != b[k].shape for k in a):
        return None
    if all(np.array_equal(a[k], b[k]) for k in a):
        return "exact"
    for key in a:
        scale = max(float(np.abs(a[key]).max(initial=0)), float(np.abs(b[key]).max(initial=0)))
        if float(np.abs(a[key] - b[key]).max(initial=0)) > INITIAL_AGREEMENT_TOLERANCE * scale:
            return None
    return "within tolerance"


class InitialAdapterVote:
    """The replies to one ask, checked one by one as they arrive; `decided` once two agree."""

    def __init__(self, lora: LoraSettings, messages: list[Message], names: Mapping[int, str]) -> None:
        self.lora = lora
        self.messages, self.names = messages, names
        self.seen: set[str] = set()
        self.candidates: list[tuple[str, State]] = []
        self.reasons: list[str] = []
        self.bytes = 0
        self.decided: tuple[State, list[str], str] | None = None  # adapter, agreeing nodes, how

    def add(self, replies: list[Message]) -> bool:
        """Check the replies not seen yet; True once two candidates agree."""
        asked = {m.metadata.message_id: self.names[m.metadata.dst_node_id] for m in self.messages}  # ids exist once pushed
        for reply in replies:
            message_id = reply.metadata.reply_to_message_id
            if message_id in self.seen or message_id not in asked:
                continue
            self.seen.add(message_id)
            self._add(asked[message_id], reply)
        return self.decided is not None

    def _add(self, node: str, reply: Message) -> None:
        try:
            if reply.has_error():
                self.reasons.append(f"node {node}: {error_reason(reply.error.reason)}")
                return
            arrays = reply.content["arrays"]
            self.bytes += comm.record_bytes(arrays)
            state = comm.decode(arrays, reply.content["wire"], expect_format="float32", expect_content=comm.WEIGHTS)
            check_adapter_layout(state, self.lora)
        except Exception as exc:  # noqa: BLE001 - whatever a node sends, it is one refused reply
            detail = quote(exc) if isinstance(exc, (comm.WireError, InitialAdapterRejected)) else f"{type(exc).__name__}: {quote(exc)}"
            self.reasons.append(f"node {node}: refused ({detail})")
            return
        for other, candidate in self.candidates:
            if self.decided is None and (how := agreement(candidate, state)):
                self.decided = (candidate, sorted([other, node]), how)
        self.candidates.append((node, state))
