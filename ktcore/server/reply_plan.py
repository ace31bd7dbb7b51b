"""What a chat request asks of the reply beyond plain text, for the OpenAI and Ollama routes alike: the tools
offered (into the chat template, or described in a system message where the template cannot render them),
how tool calls are parsed, and the grammar that ``tool_choice`` (required / a named function) and
``response_format`` (JSON object / JSON schema) put on the sampler."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ktcore.constrained import Constraint, ConstraintError, json_constraint, lark_constraint
from ktcore.reply_stream import speaks_harmony

from .errors import APIError
from .logprobs import AnswerLogprobs, TokenText
from .reply_stream import ReplyStream, reads_channels
from .tool_calls import ToolFormat, call_grammar, format_for, renders_tools, tool_system_prompt


@dataclass
class ReplyPlan:
    tools: list[dict] = field(default_factory=list)  # the function objects offered ({name, description, parameters})
    fmt: ToolFormat | None = None  # how calls are written; None: the reply is not searched for calls
    template_tools: list[dict] | None = None  # ``tools`` for apply_chat_template
    system_prompt: str | None = None  # the tools described for a template that cannot render them
    constraint: Constraint | None = None
    native: bool = False  # the chat template renders tools and tool calls itself
    channels: bool = False  # harmony (GPT-OSS): the reply is messages on channels, only some of them the answer
    as_written: bool = False  # a raw prompt (the client's own template): the reply goes out unparsed, markers kept
    most_calls: int | None = None  # parallel_tool_calls false: 1 (calls the model writes beyond it are dropped)

    @property
    def skip_special_tokens(self) -> bool:
        return not (self.channels or (self.fmt and self.fmt.needs_special_tokens))

    @property
    def harmony(self) -> bool:
        """The reply is read by channel (a harmony vocabulary, or harmony's call format)."""
        return not self.as_written and reads_channels(self.fmt, self.channels)

    def stream(self) -> ReplyStream:
        """The parser of one reply (one per choice)."""
        if self.as_written:
            return ReplyStream(None, [])
        return ReplyStream(self.fmt, self.tools, self.channels, self.most_calls)

    def answer_logprobs(self, token_text: TokenText | None) -> AnswerLogprobs:
        """The filter of one reply's log-probabilities to its answer tokens (one per choice)."""
        return AnswerLogprobs(token_text, self.harmony)


def plan_reply(tokenizer, vocab_size: int, end_ids, *, tools: list[dict] | None = None, tool_choice="auto",
               parallel_tool_calls: bool = True, json_mode: bool = False, json_schema: dict | None = None,
               format_param: str = "response_format") -> ReplyPlan:
    """``tools``: function objects; ``tool_choice``: "none", "auto", "required" or a function name;
    ``json_mode``: the answer must be JSON (of ``json_schema``, else any object). Compiling is CPU work (the
    first constraint for a tokenizer ~0.5 s): call it off the event loop."""
    tools = list(tools or [])
    names = [t["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two tools share a name", param="tools")
    if tool_choice not in ("none", "auto", "required") and tool_choice not in names:
        raise APIError(400, f"tool_choice: no tool is named '{tool_choice}'; the tools are: "
                            f"{', '.join(names) or 'none'}", param="tool_choice")
    if tool_choice == "required" and not tools:
        raise APIError(400, "tool_choice: 'required' needs tools", param="tool_choice")
    template = getattr(tokenizer, "chat_template", None)
    plan = ReplyPlan(native=renders_tools(template), channels=speaks_harmony(tokenizer))
    if tools and tool_choice != "none":
        plan.tools = tools
        plan.most_calls = None if parallel_tool_calls else 1
        plan.fmt = format_for(template)
        if plan.native:
            plan.template_tools = [{"type": "function", "function": t} for t in tools]
        else:
            plan.system_prompt = tool_system_prompt(tools)
    if tool_choice == "required":
        forced = tools
    else:
        forced = [t for t in tools if t["name"] == tool_choice]
    try:
        if forced:
            lark = call_grammar(plan.fmt, forced, tokenizer, many=parallel_tool_calls and tool_choice == "required")
            plan.constraint = lark_constraint(tokenizer, vocab_size, end_ids, lark)
        elif json_mode and plan.fmt:  # either calls or the JSON answer
            calls = re.sub(r"^start:", "calls:", call_grammar(plan.fmt, tools, tokenizer, many=parallel_tool_calls))
            answer = json.dumps(json_schema or {"type": "object"})
            plan.constraint = lark_constraint(tokenizer, vocab_size, end_ids,
                                              f"start: calls | answer\nanswer: %json {answer}\n{calls}")
        elif json_mode:
            plan.constraint = json_constraint(tokenizer, vocab_size, end_ids, json_schema)
    except ConstraintError as exc:
        param = "tools" if forced else format_param
        raise APIError(400, f"{param}: {exc}", param=param) from exc
    return plan


def check_logprobs(logprobs: bool, top_logprobs: int | None) -> None:
    """``top_logprobs`` needs ``logprobs``."""
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")


def template_messages(messages: list[dict], plan: ReplyPlan) -> list[dict]:
    """Messages ``{"role", "content", "tool_calls": [ToolCall], "tool_call_id", "name"}`` as the chat template
    takes them. Templates that render tools get Transformers' convention (``tool_calls`` with arguments as
    objects, ``tool`` messages with the function's name); the others get calls as Hermes blocks inside the
    assistant's text and tool results as user turns (``<tool_response>``), plus the tools' system prompt."""
    names = {c.id: c.name for m in messages for c in m.get("tool_calls") or ()}
    native = plan.native
    out: list[dict] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if m["role"] == "tool":
            name = m.get("name") or names.get(m.get("tool_call_id"), "")
            if native:
                out.append({"role": "tool", "content": m["content"], "tool_call_id": m.get("tool_call_id") or "",
                            "name": name})
                continue
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith("</tool_response>"):
                out[-1] = out[-1] | {"content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        elif calls and native:
            out.append({"role": "assistant", "content": m["content"],
                        "tool_calls": [{"id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                       for c in calls]})
        elif calls:
            blocks = "\n".join(f'<tool_call>\n{json.dumps({"name": c.name, "arguments": _arguments(c.arguments)})}'
                               "\n</tool_call>" for c in calls)
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + blocks})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if plan.system_prompt:
        if out and out[0]["role"] == "system":
            out[0] = out[0] | {"content": out[0]["content"] + "\n\n" + plan.system_prompt}
        else:
            out.insert(0, {"role": "system", "content": plan.system_prompt})
    return out


def _arguments(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text

