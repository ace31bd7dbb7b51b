"""``kt run MODEL -p PROMPT``: one completion, streamed to stdout, timing on stderr.

Also holds what ``kt chat`` shares with it: the model/sampling options, loading, and the error handling
that turns bad input into one clear line and an exit code instead of a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
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
                        "rule file for the model's architecture and this machine); a file that says "
                        "'- extends: default' is layered over the shipped one, so it need hold only what it changes")
    p.add_argument("--layout", default=None, choices=("cpu", "gpu-cpu", "gpu"),
                   help="which shipped rule file: cpu (all on the CPU), gpu-cpu (dense part on the accelerator, "
                        "routed experts on the CPU), gpu (all on the accelerator); default: the first that runs here")
    p.add_argument("--device", default=None,
                   help="device for the modules the rules leave unplaced: cpu, cuda, cuda:N, xpu, npu, mps "
                        "(default: what the rule file says)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="stop after this many tokens (default 512)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="KV cache size in tokens: prompt plus reply (default 4096)")
    p.add_argument("--model-path", default=None, metavar="DIR",
                   help="Hugging Face directory whose config and tokenizer replace those in the GGUF metadata")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run decode steps eagerly (default on CUDA: replay a captured CUDA graph per step "
                        "when every op of the model allows it)")
    p.add_argument("-q", "--quiet", action="store_true", help="no loading messages and no timing line")


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


# ---------------------------------------------------------------------------------------------- checks

DEVICE_RE = re.compile(r"^(cpu|cuda|xpu|npu|mps)(?::(\d+))?$")


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


def check_args(args) -> None:
    """Every check that needs no torch: the model path, numbers, rule files, the device's spelling."""
    check_model_path(args.model)
    if args.max_context < 2:
        raise CLIError(f"--max-context must be at least 2, got {args.max_context}")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    for path in args.rules or []:
        if not Path(path).is_file():
            raise CLIError(f"--rules {path}: no such file")
    if args.device is not None and not DEVICE_RE.match(args.device):
        raise CLIError(f"--device {args.device}: not a device name; use cpu, cuda, cuda:N, xpu, npu or mps")


def check_device(device: str | None) -> None:
    """``--device`` names a device this torch build has (after ``check_args``; imports torch)."""
    if device is None or device == "cpu":
        return
    import torch

    kind, index = DEVICE_RE.match(device).groups()
    backend = getattr(torch, kind, None)
    if backend is None or not backend.is_available():
        build = f"torch {torch.__version__}"
        raise CLIError(f"--device {device}: this machine has no {kind} device for {build}"
                       + (" (a CPU-only build of torch)" if kind == "cuda" and torch.version.cuda is None else ""))
    if index is not None and int(index) >= backend.device_count():
        raise CLIError(f"--device {device}: there are {backend.device_count()} {kind} device(s), numbered from 0")


def say(args, message: str) -> None:
    """A loading message on stderr (not with -q)."""
    if not args.quiet:
        print(f"kt {args.command}: {message}", file=sys.stderr, flush=True)


def warn(args, message: str) -> None:
    """Something the user should know about the reply, on stderr even with -q."""
    print(f"kt {args.command}: {message}", file=sys.stderr, flush=True)


def context_limit_note(final, max_context: int) -> str | None:
    """What to say when a reply ended because the KV cache was full (``None`` when it did not)."""
    t = final.timing
    if final.finish_reason != "length" or t is None or t.prompt_tokens + t.generated_tokens < max_context:
        return None
    return (f"the reply stopped at the context limit: {t.prompt_tokens} prompt + {t.generated_tokens} reply "
            f"tokens fill the {max_context} of --max-context")


def _size(path: str) -> str:
    p = Path(path)
    files = [p] if p.is_file() else list(p.glob("*.gguf")) or list(p.glob("*.safetensors"))
    return f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------- loading


class Phases:
    """What loading is doing now, on one line of a terminal that each phase overwrites (nothing with -q or
    when stderr is no terminal: the "loading" line and the weights' progress bar are enough there)."""

    def __init__(self, args):
        self.on = not args.quiet and sys.stderr.isatty()

    def __call__(self, text: str) -> None:
        if self.on:
            sys.stderr.write(f"\r\033[K  {text}...")
            sys.stderr.flush()

    def clear(self) -> None:
        self("")
        if self.on:
            sys.stderr.write("\r\033[K")


def load_generator(args, check=None, needs_chat_template: bool = False):
    """Load the model named by ``args`` and wrap it in a ``Generator``; returns it with the sampling
    parameters. Bad input is refused in order of cost, all before the weights are read: ``check_args`` (no
    imports), the device and sampling options, rule files, a missing chat template when
    ``needs_chat_template`` (from the metadata, before the tokenizer is built), then ``check(tokenizer)``."""
    check_args(args)
    say(args, f"loading {args.model} ({_size(args.model)})")
    phase = Phases(args)
    phase("importing torch")
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # torch and the CPU plugins' pools read it
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    check_device(args.device)
    params = sampling_from_args(args)
    from ktcore.generate import Generator
    from ktcore.inject import layered, load_model, select_rule_file
    from ktcore.rules import load_rules
    from ktcore.weights import open_source

    phase("reading the model's metadata and rule file")
    source = open_source(args.model, model_path=args.model_path)
    model_type = source.config().model_type
    layout = getattr(args, "layout", None)
    ruleset = (layered(args.rules, model_type, layout=layout) if args.rules
               else load_rules(select_rule_file(model_type, layout=layout)))
    no_template = CLIError(f"{args.model} has no chat template; use `kt run --raw` or pass --model-path DIR "
                           "with a tokenizer that has one")
    if needs_chat_template and hasattr(source, "chat_template") and source.chat_template() is None:
        raise no_template
    phase("building the tokenizer")
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise CLIError(f"{args.model} carries no tokenizer; pass --model-path DIR with a Hugging Face tokenizer")
    if needs_chat_template and tokenizer.chat_template is None:
        raise no_template
    if check is not None:
        check(tokenizer)
    phase("building the model")
    model, report = load_model(source, rules=ruleset, device=args.device, progress=not args.quiet)
    phase.clear()
    files = ", ".join(getattr(report, "rule_files", []) or [])
    say(args, f"loaded {args.model}" + (f" with rules {files}" if files else ""))
    gen = Generator(model, tokenizer, max_context=args.max_context,
                    cuda_graph=None if getattr(args, "cuda_graph", True) else False)
    return gen, params


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix. Only modules already imported can have raised theirs, so this
    imports none (``except user_errors()`` is evaluated when an exception is being matched)."""
    known = [CLIError, FileNotFoundError, IsADirectoryError, PermissionError]
    for module, name in (("ktcore.generate", "ContextOverflowError"), ("ktcore.inject", "LoadError"),
                         ("ktcore.registry", "RegistryError"), ("ktcore.rules", "RuleError"),
                         ("ktcore.weights.source", "WeightError")):
        if module in sys.modules:
            known.append(getattr(sys.modules[module], name))
    return tuple(known)


def run_guarded(body, args) -> int:
    """Run ``body(args)``; user errors become one line on stderr, Ctrl-C exits 130, no tracebacks."""
    try:
        return body(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except user_errors() as exc:
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
    add_sampling_args(p)
    p.set_defaults(func=run, command="run")
    return p


def run(args) -> int:
    return run_guarded(_run, args)


def _run(args) -> int:
    check_args(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise CLIError("the prompt is empty (pass -p TEXT or pipe it on stdin)")
    request = prompt

    def check_prompt(tokenizer):
        nonlocal request
        from ktcore.generate import ContextOverflowError, encode_prompt

        if not args.raw:
            if tokenizer.chat_template is None:
                warn(args, f"{args.model} has no chat template, so the prompt goes to the model as plain text "
                           "(as with --raw); --model-path DIR can supply a tokenizer that has one")
            else:
                request = ([{"role": "system", "content": args.system}] if args.system else [])
                request.append({"role": "user", "content": prompt})
        n = len(encode_prompt(tokenizer, request))
        if n >= args.max_context:
            raise ContextOverflowError(f"the prompt has {n} tokens and the context holds {args.max_context} "
                                       "(shorten the prompt or raise --max-context)")

    gen, params = load_generator(args, check=check_prompt)
    final = None
    for delta in gen.generate(request, params):
        if delta.text:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        final = delta
    sys.stdout.write("\n")
    sys.stdout.flush()
    if final is not None:
        if not args.quiet:
            print(f"[{final.timing.summary()} | finish: {final.finish_reason}]", file=sys.stderr)
        note = context_limit_note(final, args.max_context)
        if note:
            warn(args, note)
    return 0
