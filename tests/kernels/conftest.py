"""Kernel tests run the Triton kernels on the CPU through the interpreter: TRITON_INTERPRET must be
set before triton is imported, so it is set here, at collection, for this directory's process."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
