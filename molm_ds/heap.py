"""The cyclic garbage collector around a process's start-up.

    heap.hold()       # first thing a command line does: no collections while it imports and builds
    ...               # imports, model, engine, resume
    heap.release()    # what exists now is frozen (never walked again), collection resumes

Start-up creates hundreds of thousands of long-lived objects (torch, torch._dynamo, which every torch
optimizer imports, Inductor, which DeepSpeed imports through its Muon optimizer, the model) and almost no
garbage, yet the collector runs a full collection again and again while the heap grows (docs/training.md,
"User errors" and "Tests", has the measurement). At the end of start-up one collection frees what
garbage there is, and ``gc.freeze()`` moves the rest to the permanent generation, so a full collection
during training walks only what training allocates: shorter collector pauses on every rank (as Megatron-LM's
manual GC and torchtitan's GC handler aim at), and cycles made during training are collected as usual.
An ordinary interpreter exit unfreezes first, so the teardown frees those objects as it always did.

Only a command line calls ``hold()`` (``launch/pretrain.py``'s entry point); ``release()`` does nothing
unless ``hold()`` turned the collector off, so a library call (a test training in-process, with its own
collector settings) is left alone.
"""

from __future__ import annotations

import atexit
import gc

__all__ = ["hold", "release"]

_held = False


def hold() -> None:
    """Turn the collector off until :func:`release` (a no-op if it is off already)."""
    global _held
    if gc.isenabled():
        gc.disable()
        _held = True


def release() -> None:
    """Collect once, freeze every object that is left and turn the collector back on, if :func:`hold` turned
    it off. Safe to call more than once."""
    global _held
    if _held:
        _held = False
        gc.collect()
        gc.freeze()
        atexit.register(gc.unfreeze)  # a teardown (MOLM_DS_DEBUG=1, a traceback) frees them as usual
        gc.enable()
