"""GPT-OSS's harmony replies read by channel as they are generated: the one reader of the server's chat
routes (``ktcore.server.reply_stream``, which adds tool calls) and of ``kt run`` / ``kt chat``.

A harmony reply is a series of messages ``<|channel|>NAME[ to=RECIPIENT]...<|message|>TEXT<|end|>``: only
the ``final`` channel (and ``commentary`` messages to no one, the preambles the user is meant to see) are
answer text; ``analysis`` is the model's reasoning, kept apart from the answer; a message to a recipient
(``functions.NAME``: a tool call) is handed out whole once it ends. The reply must be decoded with its special
tokens kept (``SamplingParams(skip_special_tokens=False)``), or the markers are gone.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from ktcore.engine.sequence import held_back

_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_ENDS = ("<|end|>", "<|call|>", "<|return|>")  # a message ends at one of these, or where the next one starts
_MARKERS = (_START, _CHANNEL, _MESSAGE, *_ENDS)
_RECIPIENT = re.compile(r"\bto=(\S+?)(?=\s|<\||$)")
_CHANNEL_NAME = re.compile(re.escape(_CHANNEL) + r"\s*(\w+)")
_ANSWER_CHANNELS = ("final", "commentary")
_REASONING_CHANNEL = "analysis"


def speaks_harmony(tokenizer) -> bool:
    """Whether the vocabulary has harmony's ``<|channel|>`` token (the engine's end tokens ask the same)."""
    token_id = tokenizer.convert_tokens_to_ids(_CHANNEL)
    return token_id is not None and token_id != tokenizer.unk_token_id


class Read(NamedTuple):
    """What one ``push`` read: answer text, reasoning text (the analysis channel, messages apart by a
    newline), and the messages to a recipient that ended, as ``(recipient, text)``."""

    answer: str
    reasoning: str
    sent: list[tuple[str, str]]


class Channels:
    """One harmony reply, pushed in pieces as it comes (``push(text, final=True)`` with its last piece).
    Answer and reasoning text come out as they arrive, except a tail that may still grow into a marker. A reply
    that does not open with a header is not harmony: all of it is answer text (a JSON answer)."""

    def __init__(self):
        self.started = False  # a header was seen: this is a harmony reply
        self.plain = False  # the reply does not start with a header: it is all answer text
        self.header: str | None = ""  # text of the header being read; None: inside a message
        self.kind = ""  # the message being read: "answer", "reasoning", or "" (to a recipient, or hidden)
        self.recipient = ""
        self.body = ""  # the message's text not yet passed on (a recipient's: all of it)
        self.thought = False  # some reasoning was passed on (the next reasoning message starts on a new line)
        self.opened = 0  # messages whose header was read

    @property
    def in_answer(self) -> bool:
        """Inside an answer message's text (its header read, its end not yet)."""
        return self.header is None and self.kind == "answer"

    def push(self, text: str, final: bool = False) -> Read:
        out = {"answer": "", "reasoning": ""}
        sent: list[tuple[str, str]] = []
        while text and not self.plain:
            if self.header is not None:  # reading a header, up to <|message|>
                self.header += text
                text = ""
                if not self.started:
                    start = self.header.lstrip()
                    if any(len(start) < len(m) and m.startswith(start) for m in (*_MARKERS, "to=")):
                        break  # too short to tell
                    if not start.startswith(("<|", "to=")):
                        self.plain = True  # not harmony after all: the whole reply is answer text
                        text, self.header = self.header, ""
                        break
                    self.started = True
                at = self.header.find(_MESSAGE)
                if at >= 0:
                    text = self.header[at + len(_MESSAGE):]
                    self._open(self.header[:at], out)
                continue
            self.body += text  # inside a message, up to its end (or the next message's start)
            text = ""
            ends = [(i, m) for m in (*_ENDS, _START, _CHANNEL) if (i := self.body.find(m)) >= 0]
            if not ends:
                keep = held_back(self.body, _MARKERS)  # may be the start of a marker
                if self.kind:
                    out[self.kind] += self.body[: len(self.body) - keep]
                if not self.recipient:
                    self.body = self.body[len(self.body) - keep:]
                break
            at, marker = min(ends)
            text = self.body[at + len(marker):] if marker in _ENDS else self.body[at:]
            self._close(self.body[:at], out, sent)
        if self.plain:
            out["answer"] += text
        elif final:
            if self.header is None:
                self._close(self.body, out, sent)
            elif not self.started:  # a short reply that only looked like a marker's start
                out["answer"] += self.header
            self.header = ""
        return Read(out["answer"], out["reasoning"], sent)

    def _open(self, header: str, out: dict) -> None:
        channel = _CHANNEL_NAME.search(header)
        channel = channel[1] if channel else ""
        recipient = _RECIPIENT.search(header)
        self.recipient = recipient[1] if recipient else ""
        self.kind = "" if self.recipient else "answer" if channel in _ANSWER_CHANNELS else \
            "reasoning" if channel == _REASONING_CHANNEL else ""
        if self.kind == "reasoning" and self.thought:
            out["reasoning"] += "\n"
        self.thought = self.thought or self.kind == "reasoning"
        self.header, self.body = None, ""
        self.opened += 1

    def _close(self, body: str, out: dict, sent: list[tuple[str, str]]) -> None:
        if self.kind:
            out[self.kind] += body
        elif self.recipient:
            sent.append((self.recipient, body))
        self.header, self.body, self.kind, self.recipient = "", "", "", ""


class AnswerTokens:
    """Which tokens of a harmony reply carry answer text, for their log-probabilities: each token's text is read
    by a ``Channels`` of its own, and a token is answer when the reader is inside the same answer message before
    and after it (markers and headers are not; the analysis channel and messages to a recipient never are). In a
    reply that is not harmony every token is. ``push(items, texts, final)`` -> the items of ``items`` (one per
    token, ``texts`` their decoded text, special tokens by name) that are answer; the first tokens are held until
    the reply shows whether it opens with a header."""

    def __init__(self):
        self.reader = Channels()
        self.undecided: list = []  # items read before the reply showed whether it is harmony

    def push(self, items: list, texts: list[str], final: bool = False) -> list:
        kept, reader = [], self.reader
        for item, text in zip(items, texts, strict=True):
            inside, opened = reader.in_answer, reader.opened
            reader.push(text)
            if reader.plain:
                kept += self.undecided + [item]
                self.undecided = []
            elif not reader.started:
                self.undecided.append(item)
            else:
                self.undecided = []  # they were the first header's
                if inside and reader.in_answer and reader.opened == opened:
                    kept.append(item)
        if final and not reader.started:  # a short reply that only looked like a marker's start: answer text
            kept, self.undecided = self.undecided + kept, []
        return kept
