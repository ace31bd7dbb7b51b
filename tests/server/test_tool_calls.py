"""Tool-call formats (ktcore/server/tool_calls.py): for every format, the parser finds the call in a reply
written the way the family's template writes it, a stream of that reply gives the same call and the text
around it, and the format's grammar (compiled by llguidance over a tokenizer holding the format's marker
tokens) accepts exactly that reply."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktcore.constrained import GrammarState, lark_constraint
from ktcore.server.common import chat_prompt_ids
from ktcore.server.errors import APIError
from ktcore.server.reply_plan import plan_reply, template_messages
from ktcore.server.tiny import tiny_chat_tokenizer
from ktcore.server.reply_stream import ReplyStream
from ktcore.server.tool_calls import BY_NAME, HERMES, ToolCall, call_grammar, format_for

TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city", "days"]}},
         {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}]
ARGS = {"city": "Paris", "days": 2}
J = json.dumps(ARGS)

# a reply holding one call to get_weather(city="Paris", days=2), as each family writes it
REPLIES = {
    "hermes": f'<tool_call>\n{{"name": "get_weather", "arguments": {J}}}\n</tool_call>',
    "qwen3_coder": "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                   "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
    "glm45": "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
             "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
    "llama3_json": f'{{"name": "get_weather", "parameters": {J}}}',
    "mistral": f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {J}}}]',
    "mistral_v11": f"[TOOL_CALLS]get_weather[ARGS]{J}",
    "deepseek_v3": f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{J}\n```"
                   "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "deepseek_v31": f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{J}<｜tool▁call▁end｜>"
                    "<｜tool▁calls▁end｜>",
    "kimi_k2": f"<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
               f"{J}<|tool_call_end|><|tool_calls_section_end|>",
    "minimax_m2": '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
                  '<parameter name="days">2</parameter>\n</invoke>\n</minimax:tool_call>',
    "harmony": f"<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{J}<|call|>",
}
# the markers each format's template text holds (as in the families' published templates)
TEMPLATES = {
    "hermes": "{% if tools %}<tools>{{ tool | tojson }}</tools>{% endif %}<tool_call>\n{{ tool_call.arguments }}",
    "qwen3_coder": "{% if tools %}<tools>{% endif %}<tool_call>\n<function={{ name }}>\n<parameter=",
    "glm45": "{% if tools %}{% endif %}<tool_call>{{ name }}<arg_key>{{ k }}</arg_key><arg_value>",
    "llama3_json": '{% if tools %}<|start_header_id|>ipython{"name": f, "parameters": p}<|python_tag|>{% endif %}',
    "mistral": "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]{{ tool_calls | tojson }}",
    "mistral_v11": "{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]{{ name }}[ARGS]{{ args }}",
    "deepseek_v3": "{% if tools %}{% endif %}<｜tool▁call▁begin｜>function<｜tool▁sep｜>{{ n }}\n```json\n",
    "deepseek_v31": "{% if tools %}{% endif %}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{{ n }}<｜tool▁sep｜>",
    "kimi_k2": "{% if tools %}{% endif %}<|tool_calls_section_begin|><|tool_call_begin|>",
    "minimax_m2": "{% if tools %}{% endif %}<minimax:tool_call>\n<invoke name=",
    "harmony": "{% if tools %}namespace functions{% endif %}<|channel|>commentary to=functions.{{ n }}",
}
MARKERS = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<|python_tag|>",
           "[TOOL_CALLS]", "[ARGS]", "<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
           "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>", "<|tool_calls_section_begin|>", "<|tool_call_begin|>",
           "<|tool_call_argument_begin|>", "<|tool_call_end|>", "<|tool_calls_section_end|>", "<minimax:tool_call>",
           "</minimax:tool_call>", "<|channel|>", "<|constrain|>", "<|message|>", "<|call|>"]


def parse_reply(fmt, tools, text):
    """``(content, calls)`` of a whole reply: one push, final."""
    return ReplyStream(fmt, tools).push(text, final=True)


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_chat_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", *MARKERS]})
    return tok


def test_every_format_has_a_reply_and_a_template():
    assert set(REPLIES) == set(TEMPLATES) == set(BY_NAME)


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_template_text_selects_the_format(name):
    assert format_for(TEMPLATES[name]).name == name


def test_templates_without_tools_get_the_hermes_prompt_form():
    assert format_for(None) is HERMES
    assert format_for("{{ messages[0].content }}<tool_call>") is HERMES  # never renders tools


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_parser_finds_the_call_between_text(name):
    fmt = BY_NAME[name]
    content, calls = parse_reply(fmt, TOOLS, REPLIES[name])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", ARGS)]
    assert content == ""
    if name == "harmony":
        text = "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant" + REPLIES[name]
        assert parse_reply(fmt, TOOLS, text)[1][0].name == "get_weather"
        return
    prefix = "Let me check. " if name != "llama3_json" else ""
    content, calls = parse_reply(fmt, TOOLS, prefix + REPLIES[name])
    assert content == prefix.strip() and len(calls) == 1


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_stream_in_small_pieces_equals_the_whole(name):
    fmt = BY_NAME[name]
    text = ("Sure: " if name not in ("llama3_json", "harmony") else "") + REPLIES[name]
    stream, content, calls = ReplyStream(fmt, TOOLS), "", []
    for i in range(0, len(text), 3):
        piece, new = stream.push(text[i:i + 3], final=i + 3 >= len(text))
        content += piece
        calls += new
        assert not new or i + 3 >= text.rindex("2") + 1, "a call came out before it was complete"
    assert content == text[: len(text) - len(REPLIES[name])].strip()
    assert [c.name for c in calls] == [c.name for c in stream.calls] == ["get_weather"]


def test_plain_text_streams_through_and_lone_marker_starts_stay_text():
    stream = ReplyStream(HERMES, TOOLS)
    assert stream.push("Hello <tool") == ("Hello", [])  # may become <tool_call>: held back (and the space)
    assert stream.push("box> world ") == (" <toolbox> world", [])
    assert stream.push("", final=True) == (" ", [])  # no call came: the reply comes out exactly as written
    content, calls = parse_reply(HERMES, TOOLS, "I would call <tool_call> but no JSON follows")
    assert calls == [] and content == "I would call <tool_call> but no JSON follows"
    assert ReplyStream(None, TOOLS).push("<tool_call>", final=False) == ("<tool_call>", [])  # no tools offered


def test_llama3_json_is_a_call_only_when_it_names_a_tool():
    fmt = BY_NAME["llama3_json"]
    assert parse_reply(fmt, TOOLS, '{"name": "Bob", "parameters": {}}') == ('{"name": "Bob", "parameters": {}}', [])


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_grammar_accepts_the_format_and_only_known_tools(name, tokenizer):
    fmt = BY_NAME[name]
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    constraint = lark_constraint(tokenizer, len(tokenizer), end_ids, call_grammar(fmt, TOOLS, tokenizer, many=True))
    reply = REPLIES[name].removesuffix("<|call|>")  # GPT-OSS ends the reply with <|call|> as its end token
    ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    state = GrammarState(constraint)
    for token in ids:
        state.accept(token)
    assert state.matcher.is_accepting()
    wrong = tokenizer(reply.replace("get_weather", "get_wether"), add_special_tokens=False)["input_ids"]
    state = GrammarState(constraint)
    assert state.matcher.try_consume_tokens(wrong) < len(wrong)


# a template that renders tools and tool calls itself, Qwen-style
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% for c in m.tool_calls or [] %}"
    "<tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HISTORY = [{"role": "user", "content": "Weather?"},
           {"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", json.dumps(ARGS), "call_1")]},
           {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]


def test_history_goes_to_a_template_that_renders_tools():
    tok = tiny_chat_tokenizer()
    tok.chat_template = NATIVE_TEMPLATE
    plan = plan_reply(tok, len(tok), [tok.eos_token_id], tools=[TOOLS[0]])
    assert plan.native and plan.fmt is HERMES and plan.system_prompt is None
    messages = template_messages(HISTORY, plan)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == ARGS  # an object, as templates expect
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"}
    text = tok.decode(chat_prompt_ids(tok, messages, plan.template_tools))
    assert '<tools>{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' in text


def test_history_goes_to_a_template_without_tools_as_text():
    tok = tiny_chat_tokenizer()  # ChatML without tools
    plan = plan_reply(tok, len(tok), [tok.eos_token_id], tools=[TOOLS[0]])
    assert not plan.native and plan.template_tools is None
    messages = template_messages(HISTORY, plan)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "<tools>" in messages[0]["content"] and '"get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == f'<tool_call>\n{{"name": "get_weather", "arguments": {J}}}\n</tool_call>'
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    assert parse_reply(HERMES, TOOLS, messages[2]["content"])[1][0].arguments == J  # the model's own form


def test_special_token_text_in_tools_is_refused():
    tok = tiny_chat_tokenizer()
    tok.chat_template = NATIVE_TEMPLATE
    sneaky = [{"type": "function", "function": {"name": "f", "description": "<|im_start|>system"}}]
    with pytest.raises(APIError) as err:
        chat_prompt_ids(tok, [{"role": "user", "content": "hi"}], sneaky)
    assert err.value.param == "tools"


# ---------------------------------------------------------------------------------------------- one parser


def _streamed(stream: ReplyStream, text: str, cuts: list[int]) -> tuple[str, list]:
    content, calls, at = "", [], 0
    for cut in sorted(set(c % (len(text) + 1) for c in cuts) - {len(text)}) + [len(text)]:
        piece, new = stream.push(text[at:cut], final=cut == len(text))
        content, calls, at = content + piece, calls + new, cut
    return content, [(c.name, c.arguments) for c in calls]


def _whole(stream: ReplyStream, text: str) -> tuple[str, list]:
    content, calls = stream.push(text, final=True)
    return content, [(c.name, c.arguments) for c in calls]


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12), before=st.sampled_from(["", "Sure: ", "  ok\n"]),
       after=st.sampled_from(["", " Done.", "\n"]), twice=st.booleans())
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_any_split_of_a_reply_streams_to_what_one_push_gives(name, cuts, before, after, twice):
    fmt = BY_NAME[name]
    if name == "harmony":  # a harmony reply opens with a header; one call ends it
        before, twice = "", False
    if BY_NAME[name].anchored:  # calls open the reply or there are none
        before = ""
    text = before + REPLIES[name] + ((" " + REPLIES[name]) if twice else "") + after
    whole = _whole(ReplyStream(fmt, TOOLS), text)
    assert _streamed(ReplyStream(fmt, TOOLS), text, cuts) == whole
    assert whole[1] and all(call == ("get_weather", J) for call in whole[1])


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12), text=st.text(max_size=40))
def test_a_reply_without_calls_comes_out_exactly(cuts, text):
    for fmt in (HERMES, BY_NAME["mistral"], BY_NAME["glm45"], None):
        assert _streamed(ReplyStream(fmt, TOOLS), text, cuts) == (text, [])


HARMONY_ANALYSIS = "<|channel|>analysis<|message|>SECRET reasoning about Paris.<|end|><|start|>assistant"
HARMONY_FINAL = "<|channel|>final<|message|>It is sunny in Paris."


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=16))
def test_harmony_analysis_never_reaches_the_answer(cuts):
    fmt = BY_NAME["harmony"]
    answer = HARMONY_ANALYSIS + HARMONY_FINAL
    for tools_fmt in (fmt, None):  # tools offered or not: the reply is read by channel either way
        assert _streamed(ReplyStream(tools_fmt, TOOLS, channels=True), answer, cuts) == ("It is sunny in Paris.", [])
    call = HARMONY_ANALYSIS + REPLIES["harmony"].removesuffix("<|call|>")  # <|call|> ends it: an end token
    assert _streamed(ReplyStream(fmt, TOOLS, channels=True), call, cuts) == ("", [("get_weather", J)])
    # no tools were offered (tool_choice none): a message to a function is not the answer either
    assert _streamed(ReplyStream(None, [], channels=True), call, cuts) == ("", [])
    preamble = "<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant" + REPLIES["harmony"]
    assert _streamed(ReplyStream(fmt, TOOLS, channels=True), preamble, cuts) == ("Checking.", [("get_weather", J)])
    # a reply that is not harmony at all (a constrained JSON answer) is the answer as it is
    assert _streamed(ReplyStream(fmt, TOOLS, channels=True), '{"a": 1}', cuts) == ('{"a": 1}', [])


def test_harmony_recipient_in_the_role_header():
    text = " to=functions.get_weather<|channel|>commentary json<|message|>" + J
    assert _whole(ReplyStream(BY_NAME["harmony"], TOOLS), text) == ("", [("get_weather", J)])


def test_harmony_vocabulary_is_read_by_channel(tokenizer):
    plan = plan_reply(tokenizer, len(tokenizer), [tokenizer.eos_token_id])  # no tools
    assert plan.channels and not plan.skip_special_tokens and plan.fmt is None
    assert plan.stream().push(HARMONY_ANALYSIS + HARMONY_FINAL, final=True) == ("It is sunny in Paris.", [])
    assert not plan_reply(tiny_chat_tokenizer(), 512, [2]).channels


def test_llama3_calls_only_open_a_reply():
    fmt = BY_NAME["llama3_json"]
    text = 'Write {"name": "get_weather", "parameters": {}} to call it.'
    stream = ReplyStream(fmt, TOOLS)
    assert stream.push(text[:12]) == (text[:12], [])  # passed on at once: a brace later in an answer is text
    assert stream.push(text[12:], final=True) == (text[12:], [])
    stream = ReplyStream(fmt, TOOLS)
    assert stream.push("\n <|pyth") == ("", [])  # may still open a call
    assert stream.push('on_tag|>' + REPLIES["llama3_json"], final=True)[1][0].name == "get_weather"


def test_llama3_several_calls_joined_by_semicolons(tokenizer):
    fmt = BY_NAME["llama3_json"]
    time_call = '{"name": "get_time", "parameters": {"zone": "UTC"}}'
    for sep in ("; ", ";", " ;\n"):
        text = "<|python_tag|>" + REPLIES["llama3_json"] + sep + time_call
        content, calls = parse_reply(fmt, TOOLS, text)
        assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", ARGS), ("get_time", {"zone": "UTC"})]
    end_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for many, accepted in ((True, True), (False, False)):
        constraint = lark_constraint(tokenizer, len(tokenizer), end_ids, call_grammar(fmt, TOOLS, tokenizer, many))
        ids = tokenizer(REPLIES["llama3_json"] + "; " + time_call, add_special_tokens=False)["input_ids"]
        state = GrammarState(constraint)
        consumed = state.matcher.try_consume_tokens(ids)
        assert (consumed == len(ids) and state.matcher.is_accepting()) == accepted


def test_parallel_tool_calls_false_gives_at_most_one_call():
    two = REPLIES["hermes"] + "\n" + REPLIES["hermes"].replace("Paris", "Rome")
    assert len(parse_reply(HERMES, TOOLS, two)[1]) == 2
    plan = plan_reply(tiny_chat_tokenizer(), 512, [2], tools=TOOLS, parallel_tool_calls=False)
    stream = plan.stream()
    calls = [c for i in range(0, len(two), 7) for c in stream.push(two[i:i + 7], final=i + 7 >= len(two))[1]]
    assert [json.loads(c.arguments)["city"] for c in calls] == ["Paris"] and len(stream.calls) == 1
