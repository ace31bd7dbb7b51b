"""A reply's text in, as it is generated, the user's answer text and its completed tool calls out: the one
reply parser of the chat routes, streamed or not (a whole reply is one ``push(text, final=True)``), OpenAI
and Ollama alike.

``ReplyStream(fmt, tools, channels)``: ``fmt`` (a ``ToolFormat``, or ``None`` when no tools were offered)
says how calls are written; ``channels`` is set for GPT-OSS's harmony format, read by channel with
``ktcore.reply_stream.Channels`` (the reader ``kt run`` and ``kt chat`` use too): only the ``final`` channel
(and ``commentary`` messages to no one) are answer text; ``analysis`` never reaches the answer; a message to
``functions.NAME`` is a tool call.

Answer text is passed on as it comes, except a tail that may still grow into a call (or channel) marker;
around calls, whitespace is trimmed (a reply that makes no call comes out exactly as written).
"""

from __future__ import annotations

from ktcore.engine.sequence import held_back
from ktcore.reply_stream import Channels

from .tool_calls import ToolCall, ToolFormat, call_schema, make_call


def reads_channels(fmt: ToolFormat | None, channels: bool) -> bool:
    """A reply is read by harmony's channels: ``channels`` (a harmony vocabulary) or harmony's call format
    (its calls are messages)."""
    return channels or (fmt is not None and fmt.find is None)


class ReplyStream:
    def __init__(self, fmt: ToolFormat | None, tools: list[dict], channels: bool = False,
                 most_calls: int | None = None):
        self.most_calls = most_calls  # calls past this many are dropped (parallel_tool_calls false)
        harmony = reads_channels(fmt, channels)
        self._parts = _Harmony(calls=fmt is not None) if harmony else _Calls(fmt, tools) if fmt else None
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


class _Harmony:
    """Harmony messages (``ktcore.reply_stream.Channels``): the answer text, and each message to
    ``functions.NAME`` a call once it ends (``calls``: the tools were offered; else dropped)."""

    def __init__(self, calls: bool):
        self.calls = calls
        self.reader = Channels()

    def push(self, text: str, final: bool) -> tuple[str, list[ToolCall]]:
        read = self.reader.push(text, final)
        if not self.calls:
            return read.answer, []
        calls = [make_call(to.removeprefix("functions."), body.strip()) for to, body in read.sent
                 if to.startswith("functions.")]
        return read.answer, [c for c in calls if c]
