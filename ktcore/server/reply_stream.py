"""A reply's text in, as it is generated, the user's answer text and its completed tool calls out: the one
reply parser of the chat routes, streamed or not (a whole reply is one ``push(text, final=True)``), OpenAI
and Ollama alike.

``ReplyStream(fmt, tools, channels)``: ``fmt`` (a ``ToolFormat``, or ``None`` when no tools were offered)
says how calls are written; ``channels`` is set for GPT-OSS's harmony format, whose reply is a series of
messages ``<|channel|>NAME[ to=RECIPIENT]...<|message|>TEXT<|end|>``: only the ``final`` channel (and
``commentary`` messages to no one, the preambles the user is meant to see) are answer text; ``analysis`` is
the model's reasoning and never reaches the answer; a message to ``functions.NAME`` is a tool call.

Answer text is passed on as it comes, except a tail that may still grow into a call (or channel) marker;
around calls, whitespace is trimmed (a reply that makes no call comes out exactly as written).
"""

from __future__ import annotations

import re

from ktcore.engine.sequence import held_back

from .tool_calls import ToolCall, ToolFormat, call_schema, make_call


class ReplyStream:
    def __init__(self, fmt: ToolFormat | None, tools: list[dict], channels: bool = False,
                 most_calls: int | None = None):
        self.most_calls = most_calls  # calls past this many are dropped (parallel_tool_calls false)
        channels = channels or (fmt is not None and fmt.find is None)  # harmony's calls are messages
        self._parts = _Channels(calls=fmt is not None) if channels else _Calls(fmt, tools) if fmt else None
        self.calls: list[ToolCall] = []  # every call so far; a new call's index is its place here

    def push(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """``(answer text, calls completed)`` of the reply's next ``text``; ``final``: the reply ends with it
        (what was held back comes out)."""
        if self._parts is None:
            return text, []
        content, calls = self._parts.push(text, final)
        if self.most_calls is not None:
            calls = calls[: max(0, self.most_calls - len(self.calls))]
        self.calls += calls
        return content, calls


class _Calls:
    """Calls in ``fmt``'s markup between answer text."""

    def __init__(self, fmt: ToolFormat, tools: list[dict]):
        self.fmt = fmt
        self.tools = {t["name"]: call_schema(t) for t in tools}
        self.held = ""  # text from the first possible call start on
        self.calling = False  # a start marker was seen: everything from there is held
        self.scan = 0  # calls before this offset of ``held`` were handed out
        self.between: list[str] = []  # held text that is not a call
        self.found = False
        self.space = ""  # trailing whitespace of the answer so far, held until text follows (dropped before a call)
        self.closed = False  # no call can come any more (an anchored format's reply opened with text)

    def push(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        if self.closed:
            return text, []
        if self.fmt.anchored and not self.calling:
            opening = (self.held + text).lstrip()
            if not any(s.startswith(opening[: len(s)]) for s in self.fmt.starts):
                self.closed = True
                text, self.held = self.held + text, ""
                return text, []
            if not final and not any(opening.startswith(s) for s in self.fmt.starts):
                self.held += text  # blank, or a start marker's beginning: too short to tell
                return "", []
        if self.calling:
            self.held += text
            content = ""
        else:
            text = self.held + text
            starts = [i for i in (text.find(s) for s in self.fmt.starts) if i >= 0]
            if starts:
                self.calling, self.held = True, text[min(starts):]
                content = self._answer(text[: min(starts)], final=False)
            else:
                keep = 0 if final else held_back(text, self.fmt.starts)
                self.held = text[len(text) - keep:]
                return self._answer(text[: len(text) - keep], final), []
        calls = self._complete()
        if final:
            content += self._finish()
        return content, calls

    def _answer(self, text: str, final: bool) -> str:
        text = self.space + text
        body = text if final else text.rstrip()
        self.space = text[len(body):]
        return body

    def _complete(self) -> list[ToolCall]:
        calls = []
        while (found := self.fmt.find(self.held, self.scan, self.tools)) is not None:
            start, end, new = found
            self.between.append(self.held[self.scan:start])
            self.scan = end
            calls += new
        self.found = self.found or bool(calls)
        return calls

    def _finish(self) -> str:
        """The held text that is not a call: all of it when no call came (the start marker was just text)."""
        rest = "".join(self.between) + self.held[self.scan:] if self.found else self.held
        space = self.space
        self.held, self.scan, self.between, self.space = "", 0, [], ""
        for marker in self.fmt.wrappers:
            rest = rest.replace(marker, "")
        if not self.found:
            return space + rest
        rest = rest.strip()
        return space + rest if rest else ""


_START, _CHANNEL, _MESSAGE = "<|start|>", "<|channel|>", "<|message|>"
_ENDS = ("<|end|>", "<|call|>", "<|return|>")  # a message ends at one of these, or where the next one starts
_MARKERS = (_START, _CHANNEL, _MESSAGE, *_ENDS)
_RECIPIENT = re.compile(r"\bto=(\S+?)(?=\s|<\||$)")
_CHANNEL_NAME = re.compile(re.escape(_CHANNEL) + r"\s*(\w+)")
_ANSWER_CHANNELS = ("final", "commentary")


def speaks_harmony(tokenizer) -> bool:
    """Whether the vocabulary has harmony's ``<|channel|>`` token (the engine's end tokens ask the same)."""
    token_id = tokenizer.convert_tokens_to_ids(_CHANNEL)
    return token_id is not None and token_id != tokenizer.unk_token_id


class _Channels:
    """Harmony messages: the answer channels' text out as it comes, the analysis channel dropped, each
    message to ``functions.NAME`` a call once it ends (``calls``: the tools were offered; else dropped)."""

    def __init__(self, calls: bool):
        self.calls = calls
        self.started = False  # a header was seen: this is a harmony reply
        self.plain = False  # the reply does not start with a header: it is all answer text (a JSON answer)
        self.header: str | None = ""  # text of the header being read; None: inside a message
        self.shown = False  # the message being read is answer text
        self.recipient = ""
        self.body = ""  # the message's text not yet passed on (a call's: all of it)

    def push(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        content, calls = "", []
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
                    self._open(self.header[:at])
                continue
            self.body += text  # inside a message, up to its end (or the next message's start)
            text = ""
            ends = [(i, m) for m in (*_ENDS, _START, _CHANNEL) if (i := self.body.find(m)) >= 0]
            if not ends:
                keep = held_back(self.body, _MARKERS)  # may be the start of a marker
                if self.shown:
                    content += self.body[: len(self.body) - keep]
                if self.shown or not self.recipient:
                    self.body = self.body[len(self.body) - keep:]
                break
            at, marker = min(ends)
            text = self.body[at + len(marker):] if marker in _ENDS else self.body[at:]
            content, calls = self._close(self.body[:at], content, calls)
        if self.plain:
            return content + text, calls
        if final:
            if self.header is None:
                content, calls = self._close(self.body, content, calls)
            elif not self.started:  # a short reply that only looked like a marker's start
                content += self.header
            self.header = ""
        return content, calls

    def _open(self, header: str) -> None:
        channel = _CHANNEL_NAME.search(header)
        recipient = _RECIPIENT.search(header)
        self.recipient = recipient[1] if recipient else ""
        self.shown = not self.recipient and bool(channel) and channel[1] in _ANSWER_CHANNELS
        self.header, self.body = None, ""

    def _close(self, body: str, content: str, calls: list[ToolCall]) -> tuple[str, list[ToolCall]]:
        if self.shown:
            content += body
        elif self.calls and self.recipient.startswith("functions."):
            call = make_call(self.recipient.removeprefix("functions."), body.strip())
            calls = calls + ([call] if call else [])
        self.header, self.body, self.shown, self.recipient = "", "", False, ""
        return content, calls
