"""Generate text from a trained model: prompts from the command line or a file, the run's tokenizer.

    python launch/generate.py --checkpoint runs/demo/checkpoints --prompt "def add(a, b):" --max-new-tokens 48
    python launch/generate.py --checkpoint runs/demo/hf --prompts-file prompts.txt --temperature 0.8 --top-p 0.95 \\
        --seed 1 --out completions.jsonl
Installed: molm-generate --checkpoint CKPT --prompt "..."

Greedy by default; --temperature, --top-k or --top-p sample instead (--seed for repeatable draws). The KV
cache is used; prompts are batched (--batch-size) with left padding. --checkpoint: a trainer checkpoint
directory / tag (bf16 runs: the fp32 masters) or a Hugging Face directory. Each prompt is encoded after
an EOS, the context a document starts from in training (--no-eos-prefix to feed the prompt alone);
generation stops at EOS. --prompts-file: one prompt per line, or JSON lines with a "prompt" field
(escape newlines there). Prints each prompt with its completion; --out writes JSON lines.
"""

from __future__ import annotations

import json
import math
import os
import sys

if not __package__:  # run as a script from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from molm_ds import cli  # noqa: E402


def parse_args(argv=None):
    p = cli.ArgumentParser(prog="launch/generate.py", description=__doc__.split("\n")[0], epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="trainer checkpoint dir / tag, or a Hugging Face directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", default=None, help="one prompt per line, or JSON lines with a 'prompt' field")
    p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default: the run's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (> 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of probability p, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--no-eos-prefix", action="store_true", help="do not put an EOS before each prompt")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--out", default=None, help="write {prompt, completion, tokens} JSON lines here (a file)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = p.parse_args(argv)
    if not args.prompt and not args.prompts_file:
        p.error("give --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        p.error("--max-new-tokens and --batch-size must be >= 1")
    if args.temperature is not None and not 0 < args.temperature < math.inf:
        p.error(f"--temperature {args.temperature:g} must be > 0 and finite (leave it out for greedy decoding)")
    if args.top_k is not None and args.top_k < 1:
        p.error(f"--top-k {args.top_k} must be >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top-p {args.top_p:g} must be in (0, 1]")
    if not 0 <= args.seed < 2**63:
        p.error(f"--seed {args.seed} must be in [0, 2**63)")
    for i, prompt in enumerate(args.prompt, 1):
        if not prompt.strip():
            p.error(f"--prompt #{i} is empty: give the text the model should continue")
    return args


def check_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> str | None:
    """A warning when generation runs past the context the model was trained on (None when it does not,
    or the context is unknown). Not refused: stick-breaking attention has no position embedding, so the
    model runs at any length; what it writes past its training length is just untested."""
    total = prompt_tokens + max_new_tokens
    if context is None or total <= context:
        return None
    return (f"warning: the longest prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} = {total} "
            f"tokens, past the {context} tokens the model was trained on: it runs (stick-breaking attention has no "
            f"position embedding), but text past {context} tokens is outside what it learned and each new token "
            f"costs more; use --max-new-tokens {max(1, context - prompt_tokens)} to stay inside")


def read_prompts(args) -> list[str]:
    from molm_ds.errors import DataError

    from molm_ds.paths import read_utf8

    prompts = list(args.prompt)
    if args.prompts_file:
        lines = read_utf8(args.prompts_file, what="--prompts-file", error=DataError).split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompt = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{args.prompts_file}:{n}: a JSON line needs a string 'prompt' field") from None
                if not isinstance(prompt, str) or not prompt.strip():
                    raise DataError(f"{args.prompts_file}:{n}: the 'prompt' field must be a non-empty string")
                prompts.append(prompt)
            else:
                prompts.append(line)
    if not prompts:
        raise DataError(f"--prompts-file {args.prompts_file} holds no prompt")
    return prompts


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from molm_ds.devices import resolve_device
    from molm_ds.errors import ConfigError
    from molm_ds.loading import load_source
    from molm_ds.log import setup_logging
    from molm_ds.paths import check_output_file
    from molm_ds.tokenizer import load_tokenizer

    setup_logging()
    if args.out:
        check_output_file(args.out, what="--out", error=ConfigError, overwrite=args.overwrite)
    device = resolve_device(args.device)
    prompts = read_prompts(args)
    src = load_source(args.checkpoint, tokenizer=args.tokenizer)
    vocab = src.model.config.vocab_size
    if args.top_k is not None and args.top_k > vocab:
        raise ConfigError(f"--top-k {args.top_k} is more than the model's {vocab} tokens: use --top-k <= {vocab} "
                          "(or leave it out)")
    if src.tokenizer_path is None:
        raise ConfigError(f"{args.checkpoint}: its tokenizer is not known (the data manifests name none, or it moved); "
                          "pass --tokenizer M.model")
    tok = load_tokenizer(src.tokenizer_path)
    longest = max(len(tok.encode(p)) for p in prompts) + (0 if args.no_eos_prefix else 1)
    warning = check_context(longest, args.max_new_tokens, src.context_length)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    model = src.model.to(device)
    sample = args.temperature is not None or args.top_k is not None or args.top_p is not None
    gen = torch.Generator(device=device).manual_seed(args.seed)

    results = []
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i:i + args.batch_size]
        encoded = [([] if args.no_eos_prefix else [tok.eos_id]) + tok.encode(p) for p in batch]
        if any(not e for e in encoded):
            raise ConfigError("an empty prompt with --no-eos-prefix gives the model nothing to continue")
        T = max(len(e) for e in encoded)
        ids = torch.full((len(batch), T), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for r, e in enumerate(encoded):  # left padding: every row's next token lands in the same column
            ids[r, T - len(e):] = torch.tensor(e)
            mask[r, T - len(e):] = 1
        out = model.generate(ids.to(device), args.max_new_tokens, attention_mask=mask.to(device), do_sample=sample,
                             temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                             eos_token_id=tok.eos_id, generator=gen if sample else None)
        for r, prompt in enumerate(batch):
            new = out[r, T:].tolist()
            if tok.eos_id in new:
                new = new[:new.index(tok.eos_id)]
            results.append({"prompt": prompt, "completion": tok.decode(new), "tokens": new})

    for r in results:
        print(f"=== {r['prompt']!r}")
        print(r["prompt"] + r["completion"])
    if args.out:
        from molm_ds.storage import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results),
                          what="--out")
        print(f"wrote {args.out}")
    return 0


def entry() -> None:
    cli.run(main)


if __name__ == "__main__":
    entry()
