"""``kt chat MODEL``: an interactive multi-turn conversation through the model's chat template."""

from __future__ import annotations

import argparse
import sys

from .model_options import MODEL_OPTIONS_HELP
from .prefix_options import add_prefix_cache_args
from .reply_output import ReplyPrinter
from .run import (
    EXIT_INTERRUPTED,
    add_generation_args,
    context_limit_note,
    load_generator,
    run_guarded,
    unanswered_note,
)

CHAT_HELP = """\
Type a message and press Enter. A line ending with \\ continues on the next line; a line holding only
\"\"\" starts a block that runs until the next line holding only \"\"\".
Commands: /reset (forget the conversation), /exit or /quit (leave; Ctrl-D too), /help.
Ctrl-C while the model writes stops that reply; Ctrl-C at the prompt leaves."""

CHAT_EXAMPLES = """\
examples:
  kt chat model.gguf
  kt chat model.gguf --system "You answer in one sentence." --temperature 0.7 --seed 0
  kt chat model.gguf --rules my-rules.yaml --threads 8 --max-context 8192
  printf 'Hi!\n' | kt chat model.gguf -q       replies only, nothing on stderr but errors

in the chat:
""" + CHAT_HELP


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Load MODEL and chat with it; the conversation goes through the chat template stored "
                    "in the GGUF (or in --model-path).",
        epilog=CHAT_EXAMPLES + "\n\n" + MODEL_OPTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--system", default=None, help="system message at the start of the conversation")
    p.add_argument("--no-timing", action="store_true", help="do not print the timing line after each reply")
    add_generation_args(p)
    add_prefix_cache_args(p)
    p.set_defaults(func=run, command="chat")
    return p


def read_message(read=input) -> str | None:
    """One user message (``None`` at end of input). Handles ``\\`` continuations and triple-quote blocks."""
    try:
        line = read(">>> ")
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                line = read("... ")
            except EOFError:
                break
            if line.strip() == '"""':
                break
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = read("... ")
        except EOFError:
            line = ""
            break
    lines.append(line)
    return "\n".join(lines)


def run(args) -> int:
    return run_guarded(_chat, args)


def _chat(args) -> int:
    gen, params = load_generator(args, needs_chat_template=True)
    from ktcore.prefix_cache import PrefixStore, model_salt

    # each turn prefills only what the conversation so far did not compute
    gen.keep_prefixes(PrefixStore.from_options(args, gen.device, model_salt(args.model, args.device)))
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    if not args.quiet:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            print("\nbye", file=sys.stderr)
            return EXIT_INTERRUPTED
        if text is None:
            print(file=sys.stderr)
            return 0
        command = text.strip()
        if command in ("/exit", "/quit", "/bye"):
            return 0
        if command == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if command in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}; /help lists them", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": text})
        reply = _reply(gen, messages, params, args)
        if reply is None:  # not answered: forget the question too
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": reply})


def _reply(gen, messages, params, args) -> str | None:
    from ktcore.generate import ContextOverflowError

    # the history keeps the answer only: a harmony template renders an earlier turn's final message alone
    printer = ReplyPrinter(gen.tokenizer, args.show_reasoning)
    timing = not (args.no_timing or args.quiet)
    try:
        for delta in gen.generate(messages, printer.params_for(params)):
            printer.push(delta.text, final=delta.finish_reason is not None)
            if delta.finish_reason:
                sys.stdout.write("\n")
                sys.stdout.flush()
                if timing:
                    print(f"[{delta.timing.summary()}]", file=sys.stderr)
                note = context_limit_note(delta, gen.max_context)
                if note:
                    print(f"({note}; /reset starts a new conversation)", file=sys.stderr)
                elif delta.finish_reason == "length" and printer.unanswered:
                    print(f"({unanswered_note(args)})", file=sys.stderr)
    except KeyboardInterrupt:
        print("\n(reply interrupted)", file=sys.stderr)
        return printer.answer or None
    except ContextOverflowError as exc:
        print(f"\n{exc}; /reset starts a new conversation", file=sys.stderr)
        return None
    return printer.answer
