"""Which model to load and how: the one option set of every command that loads a model (``kt run``, ``kt chat``,
``kt serve``, ``kt bench``), its checks, and the one function that loads the model and warms it up.

Bad input is refused in order of cost, all before any weight is read: ``check_model_options`` needs no
import (the model path, numbers, rule files, the device's spelling), then ``open_model`` checks the device
against this torch build, resolves the rule files and the chat template, builds the tokenizer and only then
reads the weights.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_MAX_CONTEXT = 4096
TINY_PREFIX = "tiny:"  # a random test model: tiny:<family>[?step_ms=N] (ktcore.server.tiny)
DEVICE_RE = re.compile(r"^(cpu|cuda|xpu|npu|mps)(?::(\d+))?$")

MODEL_OPTIONS_HELP = """\
model options (the same for kt run, kt chat, kt serve and kt bench):
  The shipped rule file for the model's architecture decides which op runs each module; --layout picks
  among them (default: gpu-cpu where torch has an accelerator, else cpu) and --rules layers a file of your
  own over it (a file starting with '- extends: default' need hold only what it changes). Kernels are
  compiled, autotuned and CUDA graphs captured by a short warm-up at load, before the first reply.
"""


class CLIError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The model argument and the options that decide how it is loaded."""
    p.add_argument("model", help="GGUF file (the first part of a split set), or a directory holding GGUF files")
    g = p.add_argument_group("model options")
    g.add_argument("--rules", action="append", default=None, metavar="YAML",
                   help="rule file deciding which op runs each module (repeatable; default: the shipped "
                        "rule file for the model's architecture and this machine); a file that says "
                        "'- extends: default' is layered over the shipped one, so it need hold only what it changes")
    g.add_argument("--layout", default=None, choices=("cpu", "gpu-cpu", "gpu"),
                   help="which shipped rule file: cpu (all on the CPU), gpu-cpu (dense part on the accelerator, "
                        "routed experts on the CPU), gpu (all on the accelerator); default: the first that runs here")
    g.add_argument("--device", default=None,
                   help="device for the modules the rules leave unplaced: cpu, cuda, cuda:N, xpu, npu, mps "
                        "(default: what the rule file says)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the CPU plugins' pools (default: torch's choice)")
    g.add_argument("--max-context", type=int, default=None,
                   help=f"KV cache size in tokens per sequence: prompt plus reply (default {DEFAULT_MAX_CONTEXT}, "
                        "or the model's own context length when smaller)")
    g.add_argument("--model-path", default=None, metavar="DIR",
                   help="Hugging Face directory whose config and tokenizer replace those in the GGUF metadata")
    g.add_argument("--loader", choices=("ktcore", "transformers"), default="ktcore",
                   help="ktcore (default: rule files, quantized ops) or transformers (plain Transformers over the "
                        "GGUF dequantized to float32: a reference, slow; takes no --rules or --layout)")
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false",
                   help="run decode steps eagerly (default on CUDA: replay a captured CUDA graph per step "
                        "when every op of the model allows it)")
    g.add_argument("-q", "--quiet", action="store_true", help="no loading messages and no timing line")


# ---------------------------------------------------------------------------------------------- checks


def check_model_path(path: str) -> None:
    """Say plainly what is wrong with MODEL before any heavy import."""
    if path.startswith(TINY_PREFIX):
        return
    p = Path(path)
    if not p.exists():
        raise CLIError(f"model file not found: {path}")
    if p.is_dir() and not any(p.glob("*.gguf")) and not any(p.glob("*.safetensors")):
        raise CLIError(f"{path} is a directory without any .gguf (or .safetensors) file")
    if p.is_file() and p.suffix != ".gguf":
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise CLIError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")


def check_model_options(args) -> None:
    """Every check of the model options that needs no torch: the model path, numbers, rule files, the
    device's spelling, options the loader does not take."""
    check_model_path(args.model)
    if args.max_context is not None and args.max_context < 2:
        raise CLIError(f"--max-context must be at least 2, got {args.max_context}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    for path in args.rules or []:
        if not Path(path).is_file():
            raise CLIError(f"--rules {path}: no such file")
    if args.device is not None and not DEVICE_RE.match(args.device):
        raise CLIError(f"--device {args.device}: not a device name; use cpu, cuda, cuda:N, xpu, npu or mps")
    if args.loader == "transformers" or args.model.startswith(TINY_PREFIX):
        what = "--loader transformers" if args.loader == "transformers" else "a tiny: test model"
        for flag, value in (("--rules", args.rules), ("--layout", args.layout), ("--model-path", args.model_path)):
            if value:
                raise CLIError(f"{flag} applies to ktcore's loader; {what} takes no {flag}")


def check_device(device: str | None) -> None:
    """``--device`` names a device this torch build has (after ``check_model_options``; imports torch)."""
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


# ---------------------------------------------------------------------------------------------- messages


def say(args, message: str) -> None:
    """A loading message on stderr (not with -q)."""
    if not args.quiet:
        print(f"kt {args.command}: {message}", file=sys.stderr, flush=True)


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


def _size(path: str) -> str:
    p = Path(path)
    if path.startswith(TINY_PREFIX) or not p.exists():
        return "random test weights"
    files = [p] if p.is_file() else list(p.glob("*.gguf")) or list(p.glob("*.safetensors"))
    return f"{sum(f.stat().st_size for f in files) / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """What ``open_model`` loaded: the model, its tokenizer, ``max_context`` (the option, or its default for the
    model) and, from ktcore's loader (not the Transformers loader or a tiny test model), the rule files that
    placed it, the injection report and the weight source."""

    spec: str
    model: Any
    tokenizer: Any
    max_context: int
    rule_files: list[str] = field(default_factory=list)
    report: Any = None  # ktcore.inject.InjectReport
    source: Any = None  # the ktcore.weights source the weights came from


def apply_threads(threads: int | None) -> None:
    """``--threads``: torch's intra-op threads and (through ``OMP_NUM_THREADS``, which they read when they
    start) the CPU plugins' pools."""
    if threads is None:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def open_model(args, *, needs_chat_template: bool = False, check_options: Callable[[], None] | None = None,
               check: Callable[[Any], None] | None = None, registry=None) -> LoadedModel:
    """Load the model ``args`` names (the options of ``add_model_options``). The caller's own checks:
    ``check_options()`` once torch is imported and the device checked, before the model's files are opened;
    ``check(tokenizer)`` once the tokenizer is built, before any weight is read (``args.max_context`` holds
    its figure by then). ``needs_chat_template``: refuse a model without one before building its tokenizer.
    ``registry``: the installed plugins' by default (a test of ktcore's own torch backends passes
    ``Registry(entrypoints=False)``)."""
    check_model_options(args)
    say(args, f"loading {args.model} ({_size(args.model)})")
    if args.loader == "ktcore" and os.path.isfile(args.model):
        from ktcore.readahead import read_ahead

        read_ahead([args.model])  # the disk works while torch is imported (GGUFSource adds a split set's shards)
    phase = Phases(args)
    phase("importing torch")
    apply_threads(args.threads)
    check_device(args.device)
    if check_options is not None:
        check_options()
    if args.model.startswith(TINY_PREFIX) or args.loader == "transformers":
        loaded = _open_without_rules(args, needs_chat_template, check)
    else:
        loaded = _open_with_rules(args, phase, needs_chat_template, check, registry)
    phase.clear()
    how = (f"with rules {', '.join(loaded.rule_files)}" if loaded.rule_files
           else "(random test weights)" if args.model.startswith(TINY_PREFIX) else f"with the {args.loader} loader")
    say(args, f"loaded {args.model} {how}")
    return loaded


def _no_template(args) -> CLIError:
    return CLIError(f"{args.model} has no chat template; use `kt run --raw` or pass --model-path DIR "
                    "with a tokenizer that has one")


def _resolve_context(args, config) -> None:
    """``args.max_context``: the option, else its default for this model (set once the config is read, so
    the caller's checks and messages see the figure the cache gets)."""
    if args.max_context is None:
        own = getattr(config, "max_position_embeddings", None)
        args.max_context = min(DEFAULT_MAX_CONTEXT, own) if own else DEFAULT_MAX_CONTEXT


def _open_with_rules(args, phase, needs_chat_template, check, registry) -> LoadedModel:
    from ktcore.inject import layered, load_model, rule_variant, select_rule_file
    from ktcore.registry import get_registry
    from ktcore.rules import load_rules
    from ktcore.weights import open_source

    registry = registry if registry is not None else get_registry()
    phase("reading the model's metadata and rule file")
    source = open_source(args.model, model_path=args.model_path)
    config = source.config()
    _resolve_context(args, config)
    variant = rule_variant(source)  # native FP8 checkpoints: their own rule files
    ruleset = (layered(args.rules, config.model_type, registry, layout=args.layout, variant=variant) if args.rules
               else load_rules(select_rule_file(config.model_type, registry, layout=args.layout, variant=variant),
                               registry))
    if needs_chat_template and hasattr(source, "chat_template") and source.chat_template() is None:
        raise _no_template(args)
    phase("building the tokenizer")
    tokenizer = source.tokenizer()
    if tokenizer is None:
        raise CLIError(f"{args.model} carries no tokenizer; pass --model-path DIR with a Hugging Face tokenizer")
    if needs_chat_template and tokenizer.chat_template is None:
        raise _no_template(args)
    if check is not None:
        check(tokenizer)
    phase("building the model")
    model, report = load_model(source, rules=ruleset, device=args.device, progress=not args.quiet, registry=registry)
    for note in report.notes:
        say(args, note)
    return LoadedModel(args.model, model, tokenizer, args.max_context,
                       list(getattr(report, "rule_files", []) or []), report, source)


def _open_without_rules(args, needs_chat_template, check) -> LoadedModel:
    """A tiny random test model (``tiny:<family>[?step_ms=N]``: ``step_ms`` adds that much time to every
    forward, for tests that interrupt a reply), or plain Transformers over the GGUF."""
    if args.model.startswith(TINY_PREFIX):
        import time

        from ktcore.server.tiny import tiny_chat_model

        family, _, query = args.model[len(TINY_PREFIX):].partition("?")
        model, tokenizer = tiny_chat_model(family or "llama")
        _resolve_context(args, model.config)
        if check is not None:
            check(tokenizer)
        step_ms = float(dict(p.split("=", 1) for p in query.split("&") if p).get("step_ms", 0))
        if step_ms:
            model.register_forward_pre_hook(lambda module, inputs: time.sleep(step_ms / 1000))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        p = Path(args.model)
        _resolve_context(args, AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name))
        tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        if needs_chat_template and tokenizer.chat_template is None:
            raise _no_template(args)
        if check is not None:
            check(tokenizer)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name).eval()
    if args.device is not None:
        model = model.to(args.device)
    return LoadedModel(args.model, model, tokenizer, args.max_context)


def model_args(model: str, **options) -> argparse.Namespace:
    """The options of ``add_model_options`` as a command line would give them (defaults filled in), for code
    that loads a model the way the CLI does without a command line (benches, tests):
    ``open_model(model_args(path, threads=2, quiet=True))``."""
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args([str(model)])
    args.command = options.pop("command", "load")
    unknown = set(options) - set(vars(args))
    if unknown:
        raise TypeError(f"unknown model options {sorted(unknown)}; known: {sorted(vars(args))}")
    if isinstance(options.get("rules"), (str, Path)):
        options["rules"] = [str(options["rules"])]
    vars(args).update(options)
    return args
