"""Kernel tests. The Triton kernels run on the CPU through the interpreter in subprocesses
(``test_interpreter.py`` runs each ``interpreted/*_cases.py`` with TRITON_INTERPRET=1 set for that
process only); GPU tests are marked ``gpu`` and skip without CUDA."""
