"""``kt run MODEL -p PROMPT``: one completion, streamed to stdout, timing on stderr.

Also holds what ``kt chat`` shares with it: the model/sampling options, loading, and the error handling
that turns bad input into one clear line and an exit code instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_ERROR = 2  # as the kt dispatcher uses for errors the user can fix
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

RUN_EXAMPLES = """\
examples:
  kt run model.gguf -p "Write a haiku about the sea"
  kt run model.gguf -p "Once upon a time" --raw --max-new-tokens 64
  kt run model.gguf -p "2+2=" --temperature 0.7 --top-p 0.9 --seed 1
  kt run DeepSeek-V2-Lite-Q4_K_M.gguf -p "Hi" --rules my-rules.yaml --threads 8
"""


class CLIError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------- options


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="GGUF file (the first part of a split set), or a directory holding GGUF files")
    p.add_argument("--rules", action="append", default=None, metavar="YAML",
                   help="rule file deciding which op runs each module (repeatable; default: the shipped "
                        "rule file for the model's architecture and this machine)")
    p.add_argument("--device", default=None,
                   help="device for the modules the rules leave unplaced (default: what the rule file says)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="stop after this many tokens (default 512)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="KV cache size in tokens: prompt plus reply (default 4096)")
    p.add_argument("--model-path", default=None, metavar="DIR",
                   help="Hugging Face directory whose config and tokenizer replace those in the GGUF metadata")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run decode steps eagerly (default on CUDA: replay a captured CUDA graph per step "
                        "when every op of the model allows it)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def sampling_from_args(args):
    from ktcore.generate import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=tuple(args.stop))
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ---------------------------------------------------------------------------------------------- loading


def check_model_path(path: str) -> None:
    """Say plainly what is wrong with MODEL before any heavy import."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"model file not found: {path}")
    if p.is_dir() and not any(p.glob("*.gguf")) and not any(p.glob("*.safetensors")):
        raise CLIError(f"{path} is a directory without any .gguf (or .safetensors) file")
    if p.is_file() and p.suffix != ".gguf":
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CLIError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")


def load_generator(args, quiet: bool = False, check=None):
    """Load the model named by ``args`` and wrap it in a ``Generator``. ``check(tokenizer)`` runs before
    the weights are read, to refuse bad input early."""
    check_model_path(args.model)
    if args.max_context < 2:
        raise CLIError(f"--max-context must be at least 2, got {args.max_context}")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # torch and the CPU plugins' pools read it
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from ktcore.generate import Generator
    from ktcore.inject import load_model
    from ktcore.weights import open_source

    source = open_source(args.model, model_path=args.model_path)
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise CLIError(f"{args.model} carries no tokenizer; pass --model-path DIR with a Hugging Face tokenizer")
    if check is not None:
        check(tokenizer)
    rules = args.rules[0] if args.rules and len(args.rules) == 1 else args.rules
    model, report = load_model(source, rules=rules, device=args.device, progress=not quiet)
    if not quiet:
        files = ", ".join(getattr(report, "rule_files", []) or [])
        print(f"loaded {args.model}" + (f" with rules {files}" if files else ""), file=sys.stderr)
    return Generator(model, tokenizer, max_context=args.max_context,
                     cuda_graph=None if getattr(args, "cuda_graph", True) else False)


def run_guarded(body, args) -> int:
    """Run ``body(args)``; user errors become one line on stderr, Ctrl-C exits 130, no tracebacks."""
    from ktcore.generate import ContextOverflowError

    known = [CLIError, ContextOverflowError, FileNotFoundError, IsADirectoryError, PermissionError]
    try:
        from ktcore.inject import LoadError
        from ktcore.registry import RegistryError
        from ktcore.rules import RuleError
        from ktcore.weights.source import WeightError

        known += [LoadError, RegistryError, RuleError, WeightError]
    except ImportError:  # a core piece is missing: its own import error will say so below
        pass
    try:
        return body(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except tuple(known) as exc:
        print(f"kt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `kt run ... | head`
        sys.stderr.close()
        return EXIT_ERROR


# ---------------------------------------------------------------------------------------------- kt run


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run", help="generate one completion for a prompt",
        description="Load MODEL, generate a reply to PROMPT and stream it to stdout; a timing line "
                    "(prefill and decode tokens per second) goes to stderr. By default the prompt is sent "
                    "as a user message through the model's chat template (see --raw).",
        epilog=RUN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no loading messages and no timing line")
    add_sampling_args(p)
    p.set_defaults(func=run, command="run")
    return p


def run(args) -> int:
    return run_guarded(_run, args)


def _run(args) -> int:
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise CLIError("the prompt is empty (pass -p TEXT or pipe it on stdin)")
    params = sampling_from_args(args)
    request = prompt

    def check_prompt(tokenizer):
        nonlocal request
        from ktcore.generate import ContextOverflowError, encode_prompt

        if not args.raw and tokenizer.chat_template is not None:
            request = ([{"role": "system", "content": args.system}] if args.system else [])
            request.append({"role": "user", "content": prompt})
        n = len(encode_prompt(tokenizer, request))
        if n >= args.max_context:
            raise ContextOverflowError(f"the prompt has {n} tokens and the context holds {args.max_context} "
                                       "(shorten the prompt or raise --max-context)")

    gen = load_generator(args, quiet=args.quiet, check=check_prompt)
    final = None
    for delta in gen.generate(request, params):
        if delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        final = delta
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet and final is not None:
        print(f"[{final.timing.summary()} | finish: {final.finish_reason}]", file=sys.stderr)
    return 0
