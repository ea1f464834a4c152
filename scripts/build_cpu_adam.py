"""Build DeepSpeed's cpu_adam op (DeepSpeedCPUAdam, the optimizer of ZeRO with offload_optimizer) into torch's
extension cache (TORCH_EXTENSIONS_DIR; default ~/.cache/torch_extensions), so that the first offloaded run
does not stop for the JIT build (about a minute of two cores). `make test` runs this in the background
while pip installs the dev extra; the offload tests then load the built op, or wait on torch's build lock
while it finishes.

    DS_ACCELERATOR=cpu python scripts/build_cpu_adam.py
"""

import time


def main() -> None:
    t0 = time.time()
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(1))])  # the constructor loads the op, building it if needed
    print(f"cpu_adam ready after {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
