"""See, on the CPU, every operation that would make the host wait for a GPU.

On the CPU these operations cost nothing, so a CPU test cannot time them; but each of them blocks the
host until the device has caught up when the tensors live on a GPU:

- aten ops whose output shape depends on tensor values (``nonzero``, ``masked_select``, boolean-mask
  ``index`` / ``index_put``, ``bincount``, ``unique``, ``repeat_interleave`` without ``output_size``,
  ``histc``, ...) or which return a host value (``_local_scalar_dense``: ``.item()``, ``int(t)``,
  ``bool(t)``; ``equal``, ``is_nonzero``), seen by a ``TorchDispatchMode``;
- host copies that do not dispatch an aten op on the CPU (``Tensor.tolist``, ``.numpy``, ``.cpu``,
  ``.to("cpu")``) and blocking copies to a device (``.to(device)`` / ``.cuda()`` without
  ``non_blocking=True``), seen by patching those ``Tensor`` methods.

Custom ops of the ``molm_ds`` namespace are opaque: the mode sees the op, not its insides. On a GPU
they run Triton kernels that read their counts on the device (``molm_ds.ops``), so the CPU loop inside
the op (its per-expert row counts, the block-wise stick-breaking early exit) is not counted.

Each event is keyed by the first frame outside torch and this file, as
``molm_ds/parallel/dispatch.py:plan`` (a file of this repository and its function),
``deepspeed:is_invalid_grad_norm`` or another path, with what was seen::

    with SyncRecorder() as rec:
        rec.active = True
        loss = model(x).sum(); loss.backward()
    assert not rec.events, rec.events   # [(origin, what), ...]
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(torch.__file__)
_HERE = os.path.abspath(__file__)

aten = torch.ops.aten

# Always a sync on CUDA (output shape from values, or a value returned to the host).
_SYNC_PACKETS = {
    aten.nonzero, aten.masked_select, aten._local_scalar_dense, aten.bincount, aten.histc, aten.equal,
    aten.is_nonzero, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive,
    aten.unique_dim_consecutive, aten.masked_scatter, aten.masked_scatter_,
}
_INDEX_PACKETS = {aten.index, aten._unsafe_index}
_INDEX_PUT_PACKETS = {aten.index_put, aten.index_put_, aten._index_put_impl_, aten._unsafe_index_put}


def _bool_index(indices) -> bool:
    return any(t is not None and isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)


def sync_reason(func, args, kwargs) -> str | None:
    """Why ``func(*args, **kwargs)`` would wait for the device on CUDA, or None."""
    packet = func.overloadpacket
    if packet in _SYNC_PACKETS:
        return packet.__name__
    if packet in _INDEX_PACKETS and _bool_index(args[1]):
        return f"{packet.__name__} with a boolean mask"
    if packet in _INDEX_PUT_PACKETS and _bool_index(args[1]):
        return f"{packet.__name__} with a boolean mask"
    if packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and args[0].dtype in (
            torch.int64, torch.int32) and kwargs.get("output_size", args[2] if len(args) > 2 else None) is None:
        return "repeat_interleave without output_size"
    return None


def origin(depth: int = 1) -> str:
    """The first caller frame outside torch and this file, as ``where:function``; ``where`` is a path in
    this repository, ``deepspeed``, or another path."""
    f = sys._getframe(depth)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH) or os.path.abspath(f.f_code.co_filename) == _HERE):
        f = f.f_back
    if f is None:
        return "?"
    path = f.f_code.co_filename
    if f"{os.sep}deepspeed{os.sep}" in path:
        path = "deepspeed"
    elif path.startswith(REPO + os.sep) and "site-packages" not in path:
        path = os.path.relpath(path, REPO)
    return f"{path}:{f.f_code.co_name}"


def _to_device(args, kwargs):
    """The device a ``Tensor.to`` call names, or None (a dtype-only or ``to(other)`` call)."""
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, (torch.device, str)):
            device = a
    return device


def _non_blocking(args, kwargs) -> bool:
    return bool(kwargs.get("non_blocking", False)) or any(a is True for a in args if isinstance(a, bool))


class SyncRecorder(TorchDispatchMode):
    """Records ``(origin, what)`` for every would-be CUDA sync while ``active`` is True (see the module
    docstring). Enter it once around a whole run and flip ``active`` for the window to count.

    Host tensors: what lives on the host in a GPU run as well (tensors made from Python data by
    ``torch.tensor``, which the mode tags itself, and whatever the caller passes to ``mark_host``,
    e.g. a batch before it is copied to the device). Reading one is free; copying one to the device
    without ``non_blocking=True`` is a blocking copy. Every other tensor counts as a device tensor.
    ``.to(device)`` of a device tensor is taken as a no-op (it is one on a GPU, where the device is the
    GPU); on the CPU a literal ``.to("cpu")`` cannot be told from it, so write ``.cpu()`` for a host copy.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.events: list[tuple[str, str]] = []
        self._host: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()  # by id
        self._opaque = threading.local()
        self._saved: dict[str, Callable] = {}

    def mark_host(self, *tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._host[id(t)] = t

    def is_host(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self._host.get(id(t)) is t

    def _record(self, what: str) -> None:
        if self.active and not getattr(self._opaque, "depth", 0):
            self.events.append((origin(2), what))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "molm_ds":  # opaque: Triton on a GPU (module docstring)
            self._opaque.depth = getattr(self._opaque, "depth", 0) + 1
            try:
                return func(*args, **kwargs)
            finally:
                self._opaque.depth -= 1
        reason = sync_reason(func, args, kwargs)
        if reason is not None and not all(self.is_host(a) for a in args if isinstance(a, torch.Tensor)):
            self._record(f"aten.{reason}")
        out = func(*args, **kwargs)
        if func.overloadpacket in (aten.lift_fresh, aten.lift_fresh_copy, aten.lift):
            self.mark_host(out)
        return out

    def _patch(self) -> None:
        T = torch.Tensor
        rec = self

        def host_read(name):
            orig = getattr(T, name)

            def method(t, *a, **k):
                if not rec.is_host(t):
                    rec._record(f"Tensor.{name}")
                return orig(t, *a, **k)
            return orig, method

        def to_device(name, device_of):
            orig = getattr(T, name)

            def method(t, *a, **k):
                if rec.is_host(t) and device_of(a, k) is not None and not _non_blocking(a, k):
                    rec._record(f"blocking host-to-device copy (Tensor.{name} without non_blocking=True)")
                return orig(t, *a, **k)
            return orig, method

        patches = {"tolist": host_read("tolist"), "numpy": host_read("numpy"), "cpu": host_read("cpu"),
                   "to": to_device("to", _to_device), "cuda": to_device("cuda", lambda a, k: "cuda")}
        for name, (orig, new) in patches.items():
            self._saved[name] = orig
            setattr(T, name, new)

    def _unpatch(self) -> None:
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)
        self._saved.clear()

    def __enter__(self):
        self._patch()
        try:
            return super().__enter__()
        except BaseException:
            self._unpatch()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._unpatch()

    def by_origin(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for where, what in self.events:
            out.setdefault(where, []).append(what)
        return out
