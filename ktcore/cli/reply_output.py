"""How ``kt run`` and ``kt chat`` print a reply as it streams: the answer on stdout. A GPT-OSS (harmony)
model's reply is read by channel (``ktcore.reply_stream.Channels``, the server's reader): only the answer
reaches stdout, its reasoning (the analysis channel) goes to stderr with ``--show-reasoning`` (dimmed on a
terminal) or nowhere, and no harmony marker is printed."""

from __future__ import annotations

import argparse
import dataclasses
import sys

DIM, RESET = "\x1b[2m", "\x1b[0m"


def add_reasoning_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show-reasoning", action="store_true",
                   help="print the model's reasoning (GPT-OSS's analysis channel) to stderr; off by default")


class ReplyPrinter:
    """One reply: ``params_for(params)`` once before generating (a harmony reply is decoded with its markers),
    ``push(delta.text, final)`` for each delta; ``answer`` holds the answer text printed so far."""

    def __init__(self, tokenizer, show_reasoning: bool = False, raw: bool = False,
                 out=None, err=None):
        from ktcore.reply_stream import Channels, speaks_harmony

        self.out, self.err = out or sys.stdout, err or sys.stderr
        # a raw prompt's reply is no harmony conversation: printed as decoded, special tokens skipped
        self.reader = Channels() if not raw and speaks_harmony(tokenizer) else None
        self.show_reasoning = show_reasoning
        self.dim = show_reasoning and self.err.isatty()
        self.parts: list[str] = []
        self.thinking = False  # reasoning was printed and no answer text since (it ends with a newline first)
        self.reasoned = False  # some reasoning was read, shown or not

    @property
    def answer(self) -> str:
        return "".join(self.parts)

    @property
    def unanswered(self) -> bool:
        """The model reasoned but wrote no answer (e.g. it ran out of --max-new-tokens while reasoning)."""
        return self.reasoned and not self.parts

    def params_for(self, params):
        return params if self.reader is None else dataclasses.replace(params, skip_special_tokens=False)

    def push(self, text: str, final: bool = False) -> None:
        if self.reader is None:
            answer = text
        else:
            read = self.reader.push(text, final)
            answer = read.answer
            self.reasoned = self.reasoned or bool(read.reasoning)
            if read.reasoning and self.show_reasoning:
                self._think(read.reasoning)
        if self.thinking and (answer or final):  # the reasoning's line ends before the answer (or the timing line)
            self.err.write("\n")
            self.err.flush()
            self.thinking = False
        if answer:
            self.parts.append(answer)
            self.out.write(answer)
            self.out.flush()

    def _think(self, text: str) -> None:
        self.err.write(f"{DIM}{text}{RESET}" if self.dim else text)
        self.err.flush()
        self.thinking = True
