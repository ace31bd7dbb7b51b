"""``kt run MODEL -p PROMPT``: one completion, streamed to stdout, timing on stderr.

Also holds what ``kt chat`` shares with it: the sampling options, loading a ``Generator`` (over
``model_options``, the option set of every command that loads a model), and the error handling that turns
bad input into one clear line and an exit code instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .model_options import MODEL_OPTIONS_HELP, CLIError, add_model_options, check_model_options, open_model, say
from .reply_output import ReplyPrinter, add_reasoning_arg

EXIT_ERROR = 2  # as the kt dispatcher uses for errors the user can fix
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

RUN_EXAMPLES = """\
examples:
  kt run model.gguf -p "Write a haiku about the sea"
  kt run model.gguf -p "Once upon a time" --raw --max-new-tokens 64
  kt run model.gguf -p "2+2=" --temperature 0.7 --top-p 0.9 --seed 1
  kt run gpt-oss-20b.gguf -p "Why is the sky blue?" --show-reasoning
  kt run DeepSeek-V2-Lite-Q4_K_M.gguf -p "Hi" --rules my-rules.yaml --threads 8
"""


# ---------------------------------------------------------------------------------------------- options


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The model options (``model_options.add_model_options``), the reply's length and sampling."""
    add_model_options(p)
    p.add_argument("--max-new-tokens", type=int, default=512, help="stop after this many tokens (default 512)")
    add_reasoning_arg(p)
    add_sampling_args(p)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")


def add_profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", action="store_true",
                   help="print where each engine step's time goes (ms per step: native layers, output head, "
                        "sampling, detokenize, engine Python) on stderr")


def print_profile(profile) -> None:
    """``profile``'s tables (``ktcore.engine.step_profile``) for decode and prefill steps, on stderr."""
    for kind in ("decode", "prefill"):
        if profile.rows(kind):
            print(profile.report(kind), file=sys.stderr)


def sampling_from_args(args):
    from ktcore.generate import SamplingParams

    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                              stop=tuple(args.stop))
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ---------------------------------------------------------------------------------------------- checks


def check_args(args) -> None:
    """Every check that needs no torch: the model options, then the reply's length."""
    check_model_options(args)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")


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


# ---------------------------------------------------------------------------------------------- loading


def load_generator(args, check=None, needs_chat_template: bool = False):
    """Load the model named by ``args`` (``model_options.open_model``: every check before the weights are
    read), wrap it in a ``Generator`` and warm it up; returns it with the sampling parameters. The seconds
    the warm-up took are in ``gen.warm_up_s``."""
    check_args(args)
    loaded = open_model(args, needs_chat_template=needs_chat_template, check=check,
                        check_options=lambda: sampling_from_args(args))
    return warmed_generator(loaded, args), sampling_from_args(args)


def warmed_generator(loaded, args):
    """A ``Generator`` over ``loaded`` (``model_options.open_model``), warmed up (``ktcore.warmup``): the
    seconds it took are in ``gen.warm_up_s``, reported apart from prefill and decode."""
    from ktcore.generate import Generator
    from ktcore.warmup import warm_up_generator

    gen = Generator(loaded.model, loaded.tokenizer, max_context=loaded.max_context,
                    cuda_graph=None if args.cuda_graph else False,
                    block_size=getattr(args, "prefix_block", None))  # kt chat's --prefix-block: the KV cache's too
    gen.warm_up_s = warm_up_generator(gen)
    say(args, f"warmed up in {gen.warm_up_s:.1f} s")
    return gen


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
                    "(prefill and decode tokens per second, and apart from them the warm-up at load) goes to stderr. By default the prompt is sent "
                    "as a user message through the model's chat template (see --raw).",
        epilog=RUN_EXAMPLES + "\n" + MODEL_OPTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-p", "--prompt", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--system", default=None, help="system message (chat template only)")
    add_generation_args(p)
    add_profile_arg(p)
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
    from contextlib import nullcontext

    from ktcore.engine.step_profile import StepProfile

    profile = StepProfile() if args.profile else None
    printer = ReplyPrinter(gen.tokenizer, args.show_reasoning, raw=not isinstance(request, list))
    final = None
    with profile.active() if profile else nullcontext():
        for delta in gen.generate(request, printer.params_for(params)):
            printer.push(delta.text, final=delta.finish_reason is not None)
            final = delta
    sys.stdout.write("\n")
    sys.stdout.flush()
    if final is not None:
        if not args.quiet:
            print(f"[{final.timing.summary()} | warm-up {gen.warm_up_s:.1f} s | finish: {final.finish_reason}]",
                  file=sys.stderr)
        if profile is not None:
            print_profile(profile)
        note = context_limit_note(final, args.max_context)
        if note:
            warn(args, note)
        elif final.finish_reason == "length" and printer.unanswered:
            warn(args, unanswered_note(args))
    return 0


def unanswered_note(args) -> str:
    return (f"the reply stopped at --max-new-tokens {args.max_new_tokens} while the model was still reasoning, "
            "before its answer (raise --max-new-tokens; --show-reasoning shows the reasoning)")
