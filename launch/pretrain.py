"""Pretrain a MoLM from a job YAML on DeepSpeed (CPU or GPU, one process or many).

Single process (a one-rank gloo group is started here; the demo job is ep_size 2, so set it to 1):
    DS_ACCELERATOR=cpu python launch/pretrain.py --config configs/demo.yaml --set parallel.ep_size=1 --set training.steps=20
DeepSpeed launcher, 2 ranks on this machine (CPU: DS_ACCELERATOR=cpu; GPU: drop it):
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/pretrain.py --config configs/demo.yaml
Several machines over ssh/pdsh (hostfile lines: `node1 slots=8`):
    deepspeed --hostfile hostfile launch/pretrain.py --config job.yaml
Several machines without ssh: the same hostfile and command on every node, each with its own --node_rank:
    deepspeed --hostfile hostfile --no_ssh --num_nodes 2 --node_rank 0 --master_addr node1 --master_port 29500 \
        launch/pretrain.py --config job.yaml          # on node1; --node_rank 1 on node2
torchrun (static; elastic: --nnodes 1:2 --rdzv_backend c10d ...) and Slurm (srun, one task per rank): docs/multinode.md
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank 0 --master_addr node1 --master_port 29500 launch/pretrain.py --config job.yaml
    srun python launch/pretrain.py --config job.yaml --resume auto
OpenMPI (ranks found through mpi4py):
    mpirun -np 2 python launch/pretrain.py --config configs/demo.yaml
    (as root in a container: mpirun --allow-run-as-root --oversubscribe -np 2 ...)
Resume the newest complete checkpoint:  ... --resume auto     (or --resume runs/demo/checkpoints/step_00000100);
                                        any world size and ep_size (the optimizer state is resharded)
Start over in a used run_dir:           ... --overwrite        (deletes its metrics and checkpoints)
Resume with another global batch, mixture or seq_len: ... --resume auto --allow-data-change  (data order starts afresh)
SIGTERM / SIGUSR1 / Ctrl-C: every rank stops at the next step, saves a checkpoint and exits with code 75.
Change any job field:                   ... --set training.steps=10 --set parallel.ep_size=2
"""

from __future__ import annotations

import json
import os
import sys

if not __package__:  # run as a script from the checkout (installed, it is molm_ds.launch)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molm_ds import cli  # noqa: E402


def parse_args(argv=None):
    def job_keys():
        from molm_ds.train.job import job_keys

        return job_keys()

    p = cli.ArgumentParser(prog="launch/pretrain.py", description=__doc__.split("\n")[0], epilog=__doc__,
                           set_keys=job_keys)
    p.add_argument("--config", required=True, help="job YAML (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a job field (repeatable), value parsed as YAML")
    p.add_argument("--resume", default=None, help="'auto' or a checkpoint directory / tag (overrides the job's resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a run_dir that holds an earlier run, deleting its metrics and checkpoints")
    p.add_argument("--allow-data-change", action="store_true",
                   help="resume although the global batch, data mixture, seq_len or seed changed (the data order "
                   "starts afresh; weights, optimizer and step continue)")
    p.add_argument("--local_rank", type=int, default=None, help=cli.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from molm_ds.jobs import run
    from molm_ds.log import print0, setup_logging
    from molm_ds.train import load_job
    from molm_ds.train.preempt import EXIT_PREEMPTED

    setup_logging()
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume is not None else [])
    overrides += ["overwrite=true"] if args.overwrite else []
    overrides += ["allow_data_change=true"] if args.allow_data_change else []
    summary = run(load_job(args.config, overrides))
    print0("summary: " + json.dumps(summary))
    return EXIT_PREEMPTED if summary.get("stopped") else 0


def entry() -> None:
    from molm_ds import heap

    # a command line only (a caller of main() keeps its own collector): no collections while torch,
    # DeepSpeed and the engine are built; the trainer releases it once start-up is over
    heap.hold()
    cli.run(main)


if __name__ == "__main__":
    entry()
