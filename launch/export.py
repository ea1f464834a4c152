"""Export a trained model: a Hugging Face directory, one consolidated fp32 file, or back from Hugging Face.

A trainer checkpoint (any ep_size and ZeRO stage; bf16/fp16 runs: the fp32 master weights) to a
Hugging Face directory with this project's modeling code, the run's tokenizer and generation config:
    python launch/export.py --checkpoint runs/demo/checkpoints --out runs/demo/hf
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('runs/demo/hf', trust_remote_code=True)"
One safetensors file of the full fp32 state dict (molm-ds names, experts stacked by global id; what
DeepSpeed's zero_to_fp32.py gives for dense models), its ModelConfig in the file's metadata:
    python launch/export.py --checkpoint runs/demo/checkpoints --consolidated runs/demo/model_fp32.safetensors
A released MoLM / ModuleFormer directory (or one exported here) to a weights-only trainer checkpoint
that a job's init_from accepts (its job.yaml holds the model section to copy into the job):
    python launch/export.py --from-hf /models/MoLM-350M-4B --out runs/molm350m-init
Installed: molm-export ...

--tokenizer overrides the run's SentencePiece model (found through the checkpoint's data manifests).
--dtype float32 (default) or bfloat16 for the Hugging Face weights. --context-length (default: the
job's data.seq_len) becomes n_positions (lm-eval's window); the tokenizer has no length limit (the model has
no position embedding, so a longer text is no error).
"""

from __future__ import annotations

import json
import os
import sys

if not __package__:  # run as a script from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molm_ds import cli  # noqa: E402

DEFAULT_CONTEXT = 2048


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[:-len(u)]) * units[u])
    return int(t)


def parse_args(argv=None):
    from molm_ds.hf.export import DTYPES

    p = cli.ArgumentParser(prog="launch/export.py", description=__doc__.split("\n")[0], epilog=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="trainer checkpoint directory or step_NNNNNNNN tag")
    src.add_argument("--from-hf", dest="from_hf", help="a Hugging Face MoLM / ModuleFormer directory")
    p.add_argument("--out", help="Hugging Face directory (from --checkpoint) or checkpoint directory (from --from-hf)")
    p.add_argument("--consolidated", help="with --checkpoint: write one fp32 .safetensors file here")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the run's)")
    p.add_argument("--no-tokenizer", action="store_true", help="export without tokenizer files")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights of the Hugging Face directory")
    p.add_argument("--context-length", type=int, default=None, help="n_positions (default: the job's data.seq_len)")
    p.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size (e.g. 2GB)")
    p.add_argument("--no-masters", action="store_true", help="bf16 checkpoints: the saved bf16 weights, not the fp32 masters")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out directory or --consolidated file (the old one goes only once the "
                   "new one is complete)")
    p.add_argument("--preset", default="tiny", help="--from-hf: the preset the job.yaml's model section is written against")
    args = p.parse_args(argv)
    if args.from_hf and args.consolidated:
        p.error("--consolidated needs --checkpoint (the Hugging Face directory already is one file set)")
    if not args.out and not args.consolidated:
        p.error("give --out DIR" + (" and/or --consolidated FILE.safetensors" if args.checkpoint else ""))
    if args.consolidated and not args.consolidated.endswith(".safetensors"):
        p.error(f"--consolidated {args.consolidated}: name the file *.safetensors")
    if args.context_length is not None and args.context_length < 1:
        p.error("--context-length must be >= 1")
    try:
        args.max_shard_bytes = _size(args.max_shard_size)
    except ValueError:
        p.error(f"--max-shard-size {args.max_shard_size!r}: give a size such as 5GB or 500MB")
    if args.max_shard_bytes <= 0:
        p.error(f"--max-shard-size {args.max_shard_size!r} must be more than 0 bytes (e.g. 5GB or 500MB)")
    return args


def _check_outputs(args) -> None:
    """Every output path, before any work: --out a directory, --consolidated a file, neither replaced
    without --overwrite."""
    from molm_ds.errors import ConfigError
    from molm_ds.paths import check_output_dir, check_output_file

    if args.out:
        check_output_dir(args.out, what="--out", error=ConfigError, overwrite=args.overwrite)
    if args.consolidated:
        check_output_file(args.consolidated, what="--consolidated", error=ConfigError, overwrite=args.overwrite)


def _staged_dir(out: str, write) -> None:
    """``write(tmp)`` into a sibling temporary directory, then put it at ``out`` (replacing an earlier one):
    a failed or interrupted export leaves ``out`` as it was and no partial directory."""
    import shutil

    from molm_ds.storage import guarded_write, remove_quietly

    parent = os.path.dirname(os.path.abspath(out)) or "."
    tmp, old = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}"), None
    with guarded_write("export", out, cleanup=[tmp]):
        os.makedirs(parent, exist_ok=True)
        remove_quietly([tmp])
        try:
            write(tmp)
        except BaseException:
            remove_quietly([tmp])
            raise
        if os.path.isdir(out):
            old = os.path.join(parent, f".{os.path.basename(out)}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def from_hf(args) -> int:
    from molm_ds.config import preset_names
    from molm_ds.errors import ConfigError
    from molm_ds.interop import load_moduleformer
    from molm_ds.loading import is_hf_dir
    from molm_ds import checkpoint as ckpt

    if not is_hf_dir(args.from_hf):
        raise ConfigError(f"--from-hf {args.from_hf}: no config.json there; give a Hugging Face model directory")
    if args.preset not in preset_names():
        raise ConfigError(f"--preset {args.preset!r}: choose one of {', '.join(preset_names())}")
    try:
        model = load_moduleformer(args.from_hf)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--from-hf {args.from_hf}: {e}") from None
    _staged_dir(args.out, lambda d: ckpt.write_model(
        model, {"name": "imported", "model": {"preset": args.preset}}, d, tag=ckpt.tag_for(0), kind="imported",
        extra_files={"import.yaml": {"source": os.path.abspath(args.from_hf)}}))
    tag_dir = os.path.join(args.out, ckpt.tag_for(0))
    section = ckpt.read_job(args.out, ckpt.tag_for(0))["model"]
    print(f"wrote {tag_dir} ({model.config.total_params:,} parameters)")
    print("use it in a job:\n  init_from: " + args.out + "\n  model: " + json.dumps(section))
    tok = os.path.join(args.from_hf, "tokenizer.model")
    if os.path.isfile(tok):
        print(f"its tokenizer: {tok} (build shards with python -m data_prep.build_shards --tokenizer {tok})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from molm_ds.log import setup_logging

    setup_logging()
    _check_outputs(args)
    if args.from_hf:
        return from_hf(args)
    from molm_ds.errors import ConfigError
    from molm_ds.hf.export import export_hf
    from molm_ds.loading import is_hf_dir, load_source

    if is_hf_dir(args.checkpoint):
        raise ConfigError(f"--checkpoint {args.checkpoint} is a Hugging Face directory already; to make a trainer "
                          f"checkpoint of it use --from-hf {args.checkpoint} --out DIR")
    src = load_source(args.checkpoint, tokenizer=args.tokenizer, masters=not args.no_masters)
    model = src.model
    if args.consolidated:
        meta = {"molm_ds_config": json.dumps(model.config.model_dump(mode="json")), "source": src.where,
                "fp32_masters": str(src.masters)}
        from molm_ds.paths import save_safetensors
        from molm_ds.storage import guarded_write

        tmp = f"{args.consolidated}.tmp-{os.getpid()}"
        with guarded_write("--consolidated", args.consolidated, cleanup=[tmp]):
            os.makedirs(os.path.dirname(os.path.abspath(args.consolidated)), exist_ok=True)
            save_safetensors({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, tmp,
                             metadata={"format": "pt", **meta})
            os.replace(tmp, args.consolidated)  # an existing file (--overwrite) goes only now
        print(f"wrote {args.consolidated} ({model.config.total_params:,} fp32 parameters"
              f"{', from the fp32 masters' if src.masters else ''})")
    if args.out:
        tokenizer = None if args.no_tokenizer else src.tokenizer_path
        if tokenizer is None and not args.no_tokenizer:
            raise ConfigError(f"{args.checkpoint}: its tokenizer is not known (the data manifests name none, or it "
                              "moved); pass --tokenizer M.model (or --no-tokenizer)")
        infos = []
        _staged_dir(args.out, lambda d: infos.append(export_hf(
            model, d, tokenizer=tokenizer, context_length=args.context_length or src.context_length or DEFAULT_CONTEXT,
            dtype=args.dtype, source=src.where, max_shard_bytes=args.max_shard_bytes)))
        info = infos[0]
        print(f"wrote {args.out}: a Hugging Face directory (model_type {info['model_type']}, {args.dtype}"
              f"{', from the fp32 masters' if src.masters else ''}; {', '.join(info['weights'])}, config.json, "
              f"modeling code{', tokenizer' if info['tokenizer'] else ''}, README.md)")
        print("note: loads in transformers with trust_remote_code=True (AutoModelForCausalLM) and in lm_eval "
              "--model hf; " + ("also in IBM's ModuleFormer code (model_type moduleformer)" if info["ibm_compatible"]
                                else "not in IBM's ModuleFormer code, which would need "
                                + "; ".join(info["ibm_incompatibilities"])))
    return 0


def entry() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry()
