"""Tool calls in each model family's own chat-template format: finding them in a reply (``reply_stream``
reads a reply with these finders, whole or streamed), and the Lark grammar (llguidance's dialect) that makes
a reply one or more calls (``tool_choice: required`` or a named function).

``FORMATS`` holds one ``ToolFormat`` per format; ``format_for(chat_template)`` picks the one whose markers
the template text holds (most specific first). A template that does not render ``tools`` at all gets
``GENERIC``: the tools are described in a system message (``tool_system_prompt``) and the model is asked
for Hermes-style calls, which ``HERMES`` parses.

| format | families | a call in the reply |
|---|---|---|
| hermes | Qwen2/2.5/3 (MoE too), Hermes, SmolLM3 | ``<tool_call>{"name": .., "arguments": {..}}</tool_call>`` |
| qwen3_coder | Qwen3-Coder, Qwen3-Next | ``<tool_call><function=NAME><parameter=K>V</parameter></function>...`` |
| glm45 | GLM-4.5/4.6 | ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>`` |
| llama3_json | Llama 3.1-3.3 | ``{"name": .., "parameters": {..}}`` (after ``<|python_tag|>`` or not); several: ``;`` |
| mistral | Mistral, Mixtral | ``[TOOL_CALLS][{"name": .., "arguments": {..}}]`` or ``[TOOL_CALLS]NAME[ARGS]{..}`` |
| deepseek | DeepSeek-V3/R1, V3.1 | ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` + fenced JSON, or ``NAME<｜tool▁sep｜>{..}`` |
| kimi_k2 | Kimi K2 | ``<|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{..}<|tool_call_end|>`` |
| minimax_m2 | MiniMax-M2 | ``<minimax:tool_call><invoke name="NAME"><parameter name="K">V</parameter></invoke>...`` |
| harmony | GPT-OSS | ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{..}<|call|>`` |
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ktcore.constrained import JSON_OPTIONS


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index} | out

    def ollama(self) -> dict:
        return {"function": {"name": self.name, "arguments": json.loads(self.arguments)}}


# ---------------------------------------------------------------------------------------------- finding calls

Found = tuple[int, int, list[ToolCall]]  # (start, end) of a complete call section in the text, its calls


def _json_at(text: str, pos: int):
    """``(value, end)`` of the JSON value starting at ``pos`` (after whitespace), or ``None``."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except ValueError:
        return None


def make_call(name, args) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(name, json.dumps(args if args is not None else {}, ensure_ascii=False)) if isinstance(
        args if args is not None else {}, dict) else None


def _object_calls(value, keys=("arguments", "parameters")) -> list[ToolCall] | None:
    """Calls from ``{"name", "arguments"|"parameters"}`` or a list of such objects."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item:
            return None
        call = make_call(item["name"], next((item[k] for k in keys if k in item), {}))
        if call is None:
            return None
        calls.append(call)
    return calls or None


def _typed(value: str, schema: dict | None):
    """An XML-form argument value: text for a string parameter, else JSON where it parses."""
    value = value.strip("\n")
    if (schema or {}).get("type") == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _pairs_call(name: str, pairs, tools: dict[str, dict]) -> ToolCall:
    props = tools.get(name, {}).get("properties", {})
    return ToolCall(name, json.dumps({k: _typed(v, props.get(k)) for k, v in pairs}, ensure_ascii=False))


def _find_hermes(text, pos, tools) -> Found | None:
    start = text.find("<tool_call>", pos)
    if start < 0:
        return None
    parsed = _json_at(text, start + len("<tool_call>"))
    if parsed is None:
        return None
    value, end = parsed
    close = re.compile(r"\s*</tool_call>").match(text, end)
    calls = _object_calls(value)
    return (start, close.end(), calls) if close and calls else None


def _find_llama3(text, pos, tools) -> Found | None:
    for match in re.compile(r"(?:<\|python_tag\|>)?\s*\{").finditer(text, pos):
        parsed = _json_at(text, match.end() - 1)
        if parsed is None:
            continue
        calls = _object_calls(parsed[0])
        if calls and all(c.name in tools for c in calls):  # plain JSON is a call only if it names a tool
            end = parsed[1]
            sep = re.compile(r"\s*;").match(text, end)
            return match.start(), sep.end() if sep else end, calls
    return None


def _find_mistral(text, pos, tools) -> Found | None:
    start = text.find("[TOOL_CALLS]", pos)
    if start < 0:
        return None
    at = start + len("[TOOL_CALLS]")
    named = re.compile(r"\s*([^\[\]{}\s]+)(?:\[CALL_ID\][^\[]*)?\[ARGS\]").match(text, at)
    if named:
        parsed = _json_at(text, named.end())
        call = parsed and make_call(named.group(1), parsed[0])
        return (start, parsed[1], [call]) if call else None
    parsed = _json_at(text, at)
    calls = parsed and _object_calls(parsed[0])
    return (start, parsed[1], calls) if calls else None


_DEEPSEEK = re.compile(
    r"<｜tool▁call▁begin｜>(?:function<｜tool▁sep｜>(?P<n1>[^\n<]+)\n```(?:json)?\n(?P<a1>.*?)\n```"
    r"|(?P<n2>[^<]+?)<｜tool▁sep｜>(?P<a2>.*?))<｜tool▁call▁end｜>", re.S)


def _find_deepseek(text, pos, tools) -> Found | None:
    match = _DEEPSEEK.search(text, pos)
    if not match:
        return None
    call = make_call((match["n1"] or match["n2"]).strip(), match["a1"] if match["n1"] else match["a2"])
    return (match.start(), match.end(), [call]) if call else None


_KIMI = re.compile(r"<\|tool_call_begin\|>\s*(?:functions\.)?(?P<name>[^:<\s]+)(?::\d+)?\s*"
                   r"<\|tool_call_argument_begin\|>(?P<args>.*?)<\|tool_call_end\|>", re.S)


def _find_kimi(text, pos, tools) -> Found | None:
    match = _KIMI.search(text, pos)
    call = match and make_call(match["name"], match["args"])
    return (match.start(), match.end(), [call]) if call else None


def _xml_finder(call: re.Pattern, arg: re.Pattern):
    """A finder for calls ``call`` matches (groups ``name`` and ``body``), arguments as ``arg`` pairs."""

    def find(text, pos, tools) -> Found | None:
        match = call.search(text, pos)
        if not match:
            return None
        return match.start(), match.end(), [_pairs_call(match["name"].strip(), arg.findall(match["body"]), tools)]

    return find


_find_glm = _xml_finder(re.compile(r"<tool_call>\s*(?P<name>[^<\n]+?)\s*(?P<body>(?:<arg_key>.*?)?)</tool_call>", re.S),
                        re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S))
_find_coder = _xml_finder(
    re.compile(r"<tool_call>\s*<function=(?P<name>[^>]+)>(?P<body>.*?)</function>\s*</tool_call>", re.S),
    re.compile(r"<parameter=([^>]+)>(.*?)</parameter>", re.S))


_MINIMAX = re.compile(r"<minimax:tool_call>(?P<body>.*?)</minimax:tool_call>", re.S)
_MINIMAX_INVOKE = re.compile(r"<invoke name=\"(?P<name>[^\"]+)\">(?P<body>.*?)</invoke>", re.S)
_MINIMAX_ARG = re.compile(r"<parameter name=\"([^\"]+)\">(.*?)</parameter>", re.S)


def _find_minimax(text, pos, tools) -> Found | None:
    match = _MINIMAX.search(text, pos)
    if not match:
        return None
    calls = [_pairs_call(m["name"], _MINIMAX_ARG.findall(m["body"]), tools)
             for m in _MINIMAX_INVOKE.finditer(match["body"])]
    return (match.start(), match.end(), calls) if calls else None


# ---------------------------------------------------------------------------------------------- grammars


class Grammar:
    """Helpers for one tokenizer: ``lit(text)`` is a Lark term for ``text`` (a single added token as that
    token, ``<[id]>``, so special-token markers come out as the tokens the template uses)."""

    def __init__(self, tokenizer):
        self._added = {t.content: i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}

    def lit(self, text: str) -> str:
        return f"<[{self._added[text]}]>" if text in self._added else json.dumps(text)

    @staticmethod
    def json(schema: dict) -> str:
        return f"%json {json.dumps(schema | {'x-guidance': JSON_OPTIONS})}"


def call_schema(tool: dict) -> dict:
    """The tool's parameter schema; a call names only the declared parameters unless the schema says more
    are welcome (JSON Schema's default would let a constrained call invent any others)."""
    schema = tool.get("parameters") or {"type": "object"}
    if "properties" in schema and "additionalProperties" not in schema:
        schema = schema | {"additionalProperties": False}
    return schema


def _named_object(tools: list[dict], args_key: str) -> dict:
    """Schema of ``{"name": <one tool>, args_key: <its parameters>}``."""
    return {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]}, args_key: call_schema(t)},
                       "required": ["name", args_key], "additionalProperties": False} for t in tools]}


def _rules(name: str, alternatives: list[str]) -> str:
    return f"{name}: " + " | ".join(alternatives)


def _repeat(call: str, many: bool, sep: str = "") -> str:
    return f"{call} ({sep} {call})*" if many else call


def _hermes_grammar(tools, g: Grammar, many: bool) -> str:
    call = f'{g.lit("<tool_call>")} "\\n" {g.json(_named_object(tools, "arguments"))} "\\n" {g.lit("</tool_call>")}'
    return f"start: {_repeat('call', many, json.dumps(chr(10)))}\ncall: {call}"


def _llama3_grammar(tools, g: Grammar, many: bool) -> str:
    return f"start: {_repeat('call', many, json.dumps('; '))}\ncall: {g.json(_named_object(tools, 'parameters'))}"


def _mistral_grammar(tools, g: Grammar, many: bool, named: bool) -> str:
    if named:  # [TOOL_CALLS]NAME[ARGS]{...}
        calls = [f'{g.lit("[TOOL_CALLS]")} {json.dumps(t["name"])} {g.lit("[ARGS]")} {g.json(call_schema(t))}'
                 for t in tools]
        return f"start: {_repeat('call', many)}\n" + _rules("call", calls)
    schema = {"type": "array", "items": _named_object(tools, "arguments"), "minItems": 1}
    if not many:
        schema["maxItems"] = 1
    return f'start: {g.lit("[TOOL_CALLS]")} {g.json(schema)}'


def _deepseek_grammar(tools, g: Grammar, many: bool, fenced: bool) -> str:
    sep, fence = g.lit("<｜tool▁sep｜>"), "\n```json\n"
    if fenced:
        calls = [f'{g.lit("<｜tool▁call▁begin｜>")} "function" {sep} {json.dumps(t["name"] + fence)} '
                 f'{g.json(call_schema(t))} "\\n```" {g.lit("<｜tool▁call▁end｜>")}' for t in tools]
    else:
        calls = [f'{g.lit("<｜tool▁call▁begin｜>")} {json.dumps(t["name"])} {sep} {g.json(call_schema(t))} '
                 f'{g.lit("<｜tool▁call▁end｜>")}' for t in tools]
    return (f'start: {g.lit("<｜tool▁calls▁begin｜>")} {_repeat("call", many)} {g.lit("<｜tool▁calls▁end｜>")}\n'
            + _rules("call", calls))


def _kimi_grammar(tools, g: Grammar, many: bool) -> str:
    calls = [f'{g.lit("<|tool_call_begin|>")} {json.dumps("functions." + t["name"] + ":")} /[0-9]/ '
             f'{g.lit("<|tool_call_argument_begin|>")} {g.json(call_schema(t))} {g.lit("<|tool_call_end|>")}'
             for t in tools]
    return (f'start: {g.lit("<|tool_calls_section_begin|>")} {_repeat("call", many)} '
            f'{g.lit("<|tool_calls_section_end|>")}\n' + _rules("call", calls))


def _harmony_grammar(tools, g: Grammar, many: bool) -> str:
    calls = [f'{g.lit("<|channel|>")} {json.dumps("commentary to=functions." + t["name"] + " ")} '
             f'{g.lit("<|constrain|>")} "json" {g.lit("<|message|>")} {g.json(call_schema(t))}' for t in tools]
    return "start: call\n" + _rules("call", calls)  # one call: the reply ends at <|call|>


def _pairs_grammar(tools, many: bool, head: Callable[[str], str], arg: Callable[[str], str], tail: str,
                   wrap: tuple[str, str] = ("", ""), value: str = r"/[^<\s]([^<]*[^<\s])?/") -> str:
    """XML-form calls: ``head(name)``, then any of the tool's parameters as ``arg(key)`` (value: text without
    '<' by ``value``), then ``tail``."""
    lines, calls = [], []
    for i, t in enumerate(tools):
        keys = list(call_schema(t).get("properties", {})) or []
        args = " | ".join(arg(k) for k in keys)
        lines.append(f"args{i}: ({args})*" if keys else f'args{i}: ""')
        calls.append(f"{head(t['name'])} args{i} {tail}")
    body = _repeat("call", many)
    start = f"start: {wrap[0]} {body} {wrap[1]}".replace("  ", " ")
    return "\n".join([start, _rules("call", calls), *lines, f"VALUE: {value}"])


def _glm_grammar(tools, g: Grammar, many: bool) -> str:
    return _pairs_grammar(
        tools, many, lambda n: f'{g.lit("<tool_call>")} {json.dumps(n + chr(10))}',
        lambda k: f'{g.lit("<arg_key>")} {json.dumps(k)} {g.lit("</arg_key>")} "\\n" {g.lit("<arg_value>")} VALUE '
                  f'{g.lit("</arg_value>")} "\\n"',
        g.lit("</tool_call>"))


def _coder_grammar(tools, g: Grammar, many: bool) -> str:
    return _pairs_grammar(
        tools, many, lambda n: f'{g.lit("<tool_call>")} {json.dumps(chr(10) + "<function=" + n + ">" + chr(10))}',
        lambda k: f'{json.dumps("<parameter=" + k + ">")} VALUE "</parameter>\\n"',
        f'"</function>\\n" {g.lit("</tool_call>")}', value=r"/\n[^<]*\n/")  # the value on lines of its own


def _minimax_grammar(tools, g: Grammar, many: bool) -> str:
    return _pairs_grammar(
        tools, many, lambda n: json.dumps(f'<invoke name="{n}">\n'),
        lambda k: f'{json.dumps(f"<parameter name={chr(34)}{k}{chr(34)}>")} VALUE "</parameter>\\n"',
        '"</invoke>\\n"', (f'{g.lit("<minimax:tool_call>")} "\\n"', g.lit("</minimax:tool_call>")))


# ---------------------------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class ToolFormat:
    name: str
    markers: tuple[str, ...]  # the template text holds all of these
    starts: tuple[str, ...]  # text that opens a call in a reply (held back while streaming)
    # (text, pos, {name: parameters}) -> Found | None: the first complete call at or after pos; None: calls are
    # harmony messages, which ``reply_stream`` reads apart
    find: Callable | None
    grammar: Callable  # (tools, Grammar, many) -> Lark text: a reply of one (many: or more) calls
    wrappers: tuple[str, ...] = ()  # section markers around calls, dropped from the content
    needs_special_tokens: bool = False  # its markers are special tokens: keep them in the decoded text
    anchored: bool = False  # calls open the reply (after whitespace) or there are none: later text is content


HERMES = ToolFormat("hermes", ("<tool_call>",), ("<tool_call>",), _find_hermes, _hermes_grammar)
_DEEPSEEK_STARTS = ("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>")
_DEEPSEEK_WRAPPERS = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
FORMATS = (
    ToolFormat("kimi_k2", ("<|tool_calls_section_begin|>",), ("<|tool_calls_section_begin|>", "<|tool_call_begin|>"),
               _find_kimi, _kimi_grammar, ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"), True),
    ToolFormat("minimax_m2", ("<minimax:tool_call>",), ("<minimax:tool_call>",), _find_minimax, _minimax_grammar),
    # DeepSeek-V3/R1 fence the arguments in ```json; V3.1 writes them bare: one parser, two grammars
    ToolFormat("deepseek_v3", ("<｜tool▁call▁begin｜>", "```json"), _DEEPSEEK_STARTS, _find_deepseek,
               lambda t, g, m: _deepseek_grammar(t, g, m, fenced=True), _DEEPSEEK_WRAPPERS, True),
    ToolFormat("deepseek_v31", ("<｜tool▁call▁begin｜>",), _DEEPSEEK_STARTS, _find_deepseek,
               lambda t, g, m: _deepseek_grammar(t, g, m, fenced=False), _DEEPSEEK_WRAPPERS, True),
    ToolFormat("harmony", ("<|channel|>",), ("<|channel|>commentary", "to=functions."), None, _harmony_grammar, (),
               True),
    ToolFormat("mistral_v11", ("[TOOL_CALLS]", "[ARGS]"), ("[TOOL_CALLS]",), _find_mistral,
               lambda t, g, m: _mistral_grammar(t, g, m, named=True), (), True),
    ToolFormat("mistral", ("[TOOL_CALLS]",), ("[TOOL_CALLS]",), _find_mistral,
               lambda t, g, m: _mistral_grammar(t, g, m, named=False), (), True),
    ToolFormat("glm45", ("<tool_call>", "<arg_key>"), ("<tool_call>",), _find_glm, _glm_grammar),
    ToolFormat("qwen3_coder", ("<tool_call>", "<function="), ("<tool_call>",), _find_coder, _coder_grammar),
    HERMES,
    # Llama 3 writes bare JSON: only a reply that opens with it is calls, so a brace in an answer is text
    ToolFormat("llama3_json", ("<|start_header_id|>", "parameters"), ("<|python_tag|>", "{"), _find_llama3,
               _llama3_grammar, (), True, anchored=True),
)
BY_NAME = {f.name: f for f in FORMATS}


def renders_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def format_for(chat_template: str | None) -> ToolFormat:
    """The format of the first table row whose markers the template holds; ``HERMES`` for a template that
    does not render tools (``GENERIC`` prompt) or whose format is unknown."""
    if renders_tools(chat_template):
        for fmt in FORMATS:
            if all(m in chat_template for m in fmt.markers):
                return fmt
    return HERMES


def tool_system_prompt(tools: list[dict]) -> str:
    """The tool description for a template that cannot render tools: the tools as JSON and the Hermes-style
    call form that ``HERMES`` parses."""
    listing = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
    return ("You can call functions. They are described as JSON inside <tools></tools>:\n<tools>\n"
            f"{listing}\n</tools>\nTo call a function, answer with only this, one block per call:\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {<arguments as JSON>}}\n</tool_call>')


def call_grammar(fmt: ToolFormat, tools: list[dict], tokenizer, many: bool) -> str:
    """Lark for a reply that is only tool calls of ``tools`` (the ``function`` objects)."""
    return fmt.grammar(tools, Grammar(tokenizer), many)
