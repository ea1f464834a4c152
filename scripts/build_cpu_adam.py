"""Build DeepSpeed's cpu_adam op (DeepSpeedCPUAdam, the optimizer of ZeRO with offload_optimizer) into torch's
extension cache (TORCH_EXTENSIONS_DIR; default ~/.cache/torch_extensions), so that the first offloaded run
does not stop for the JIT build (about a minute of two cores). `make test` runs this in the background
while pip installs the dev extra; the offload tests then load the built op, or wait on torch's build lock
while it finishes.

    DS_ACCELERATOR=cpu python scripts/build_cpu_adam.py
"""

import argparse
import time

from molm_ds import cli
from molm_ds.errors import UserError, one_line


def main(argv=None) -> int:
    cli.ArgumentParser(prog="scripts/build_cpu_adam.py", description=__doc__.split("\n")[0], epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    t0 = time.time()
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    try:
        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])  # the constructor loads the op, building it if needed
    except Exception as exc:  # no C++ compiler, no ninja, a failed compile: torch's message says which
        raise UserError(f"building cpu_adam failed: {one_line(exc)}: install a C++ compiler and ninja, "
                        "or set MOLM_DS_DEBUG=1 for the traceback") from exc
    print(f"cpu_adam ready after {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    cli.run(main)
