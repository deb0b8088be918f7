"""Which tensors make a call's peak memory: live tensor storages tracked op by op.

`profile_live_tensors` runs a call under a ``TorchDispatchMode`` that sees every ATen op's outputs.
Each new storage is counted while any tensor viewing it is alive (weak references); at the highest
total the live storages are recorded with the op that made them, their shape, dtype and the
innermost module running at the time (global module hooks). Tensors that exist before the call
(weights, input) are not counted, nor memory inside an op that the op frees before it returns
(e.g. the chunk workspaces of `affmae_kernels.reference`, or oneDNN buffers): the peak resident
size (`bench.memory.measure_peak`) is the ground truth, this is its explanation.
"""
from __future__ import annotations

import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class LiveTensor:
    """One storage alive at the peak: bytes, where it was made (module path, ATen op), shape, dtype."""

    bytes: int
    module: str
    op: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class TensorProfile:
    """Peak of the summed live storages (bytes) and the storages alive at that moment."""

    peak_bytes: int = 0
    at_peak: list[LiveTensor] = field(default_factory=list)
    module_at_peak: str = ""  # module running when the peak was reached
    #: highest total reached while each module was the innermost one running
    module_peaks: dict[str, int] = field(default_factory=dict)

    def peaks_by_module(self, depth: int) -> list[tuple[str, int]]:
        """(module path cut to ``depth`` parts, highest total reached inside it), in first-seen order."""
        out: dict[str, int] = {}
        for name, peak in self.module_peaks.items():
            key = ".".join(name.split(".")[:depth]) or "(top level)"
            out[key] = max(out.get(key, 0), peak)
        return list(out.items())

    def grouped(self, depth: int | None = None) -> list[tuple[str, str, int, int]]:
        """(module, 'op shape dtype', count, bytes) rows of the storages at the peak, largest first.

        ``depth``: cut module paths to this many dotted parts (None: full path)."""
        sums: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        for t in self.at_peak:
            module = ".".join(t.module.split(".")[:depth]) if depth else t.module
            key = (module or "(top level)", f"{t.op} {list(t.shape)} {t.dtype}")
            sums[key][0] += 1
            sums[key][1] += t.bytes
        rows = [(m, what, n, b) for (m, what), (n, b) in sums.items()]
        return sorted(rows, key=lambda r: -r[3])


class _Tracker(TorchDispatchMode):
    """Counts live output storages of every op; keeps a snapshot at the highest total."""

    def __init__(self, module_stack: list[str]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.live: dict[int, list] = {}  # storage ptr -> [refs, LiveTensor]
        self.total = 0
        self.profile = TensorProfile()

    def _release(self, ptr: int) -> None:
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.total -= entry[1].bytes
            del self.live[ptr]

    def _track(self, t: torch.Tensor, op: str, inputs: set[int]) -> None:
        if t.device.type == "meta" or t.is_sparse:
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or (ptr in inputs and ptr not in self.live):  # a view of memory from before the call
            return
        if ptr in self.live:
            self.live[ptr][0] += 1
        else:
            module = self.module_stack[-1] if self.module_stack else ""
            self.live[ptr] = [1, LiveTensor(nbytes, module, op, tuple(t.shape), str(t.dtype).removeprefix("torch."))]
            self.total += nbytes
            peaks = self.profile.module_peaks
            peaks[module] = max(peaks.get(module, 0), self.total)
            if self.total > self.profile.peak_bytes:
                self.profile.peak_bytes = self.total
                self.profile.at_peak = [e[1] for e in self.live.values()]
                self.profile.module_at_peak = module
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor) and a.device.type != "meta" and not a.is_sparse}
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, op, inputs)
        return out


def profile_live_tensors(fn: Callable[[], object], model: nn.Module | None = None) -> TensorProfile:
    """Run ``fn()`` once; the live-storage peak, attributed to ``model``'s submodules by qualified name (other
    modules by class name)."""
    names = {} if model is None else {id(m): name for name, m in model.named_modules()}
    stack: list[str] = []

    def enter(module: nn.Module, _args) -> None:
        stack.append(names.get(id(module), type(module).__name__))

    def leave(module: nn.Module, _args, _out) -> None:
        if stack:
            stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave)
    tracker = _Tracker(stack)
    try:
        with tracker:
            fn()
    finally:
        pre.remove()
        post.remove()
    return tracker.profile
