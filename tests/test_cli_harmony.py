"""``kt run`` and ``kt chat`` on a GPT-OSS (harmony) model: a tiny llama with harmony's special tokens whose
logits spell a scripted reply (an analysis message, then the final answer), driven through ``kt``'s entry
point. Only the final answer reaches stdout, the analysis reaches stderr with ``--show-reasoning`` and nowhere
without it, no harmony marker is printed, and the chat's history holds the final answer for the next turn.
A model without harmony tokens prints its reply as before."""

from __future__ import annotations

import io

import pytest

from ktcore.cli import main
from ktcore.reply_stream import AnswerTokens, Channels
from ktcore.server.tiny import scripted_harmony_model, tiny_chat_model, tiny_harmony_tokenizer

REASONING = "SECRET: the user wants weather."
ANSWER = "It is sunny."
REPLY = (f"<|channel|>analysis<|message|>{REASONING}<|end|><|start|>assistant"
         f"<|channel|>final<|message|>{ANSWER}<|return|>")
FLAGS = ["--max-new-tokens", "200", "-q"]


@pytest.fixture
def harmony(monkeypatch):
    """``kt ... tiny:llama`` loads the scripted harmony model; returns its script (``prompts``: each prefill's text)."""
    script = {"reply": REPLY}
    monkeypatch.setattr("ktcore.server.tiny.tiny_chat_model",
                        lambda family="llama", seed=0: scripted_harmony_model(script))
    return script


def test_run_prints_the_final_answer_only(harmony, capsys):
    assert main(["run", "tiny:llama", "-p", "Weather in Paris?", *FLAGS]) == 0
    out, err = capsys.readouterr()
    assert out == ANSWER + "\n"
    assert "SECRET" not in err and "<|" not in err


def test_run_show_reasoning_puts_the_analysis_on_stderr(harmony, capsys):
    assert main(["run", "tiny:llama", "-p", "Weather in Paris?", "--show-reasoning", *FLAGS]) == 0
    out, err = capsys.readouterr()
    assert out == ANSWER + "\n"
    assert err == REASONING + "\n"  # not a terminal: not dimmed; its own line
    assert "<|" not in err


def test_run_raw_prints_no_markers(harmony, capsys):
    prompt = "<|start|>user<|message|>Weather?<|end|><|start|>assistant"
    assert main(["run", "tiny:llama", "-p", prompt, "--raw", *FLAGS]) == 0
    out, _ = capsys.readouterr()
    assert out == f"analysis{REASONING}assistantfinal{ANSWER}\n"  # as decoded: special tokens skipped, as before


def test_chat_shows_the_answer_and_keeps_it_in_the_history(harmony, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Weather in Paris?\nAnd tomorrow?\n"))
    assert main(["chat", "tiny:llama", "--prefix-cache-ram", "0", "--show-reasoning", *FLAGS]) == 0
    out, err = capsys.readouterr()
    assert out.count(ANSWER) == 2 and "SECRET" not in out and "<|" not in out
    assert err.count(REASONING) == 2 and "<|" not in err
    # the second turn's prompt holds the first answer as the template renders a final message, no analysis
    second = harmony["prompts"][-1]
    assert (f"<|start|>assistant<|channel|>final<|message|>{ANSWER}<|end|>"
            "<|start|>user<|message|>And tomorrow?") in second
    assert "SECRET" not in second and "analysis" not in second


def test_chat_without_show_reasoning_prints_no_analysis(harmony, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Weather in Paris?\n"))
    assert main(["chat", "tiny:llama", "--prefix-cache-ram", "0", *FLAGS]) == 0
    out, err = capsys.readouterr()
    assert ANSWER in out and "SECRET" not in out + err and "<|" not in out + err


def test_plain_model_output_is_unchanged(capsys):
    """Without harmony tokens the reply is printed as generated, whatever --show-reasoning says."""
    from ktcore.generate import Generator, SamplingParams

    model, tokenizer = tiny_chat_model("llama")
    expected, _ = Generator(model, tokenizer, max_context=4096, cuda_graph=False).complete(
        [{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=12))
    assert expected.strip()
    for extra in ([], ["--show-reasoning"]):
        assert main(["run", "tiny:llama", "-p", "hi", "--max-new-tokens", "12", "-q", *extra]) == 0
        out, err = capsys.readouterr()
        assert out == expected + "\n" and err == ""


@pytest.mark.parametrize("pieces", [1, 3, 7])
def test_channels_any_split_reads_the_same(pieces):
    """Answer and reasoning come out whole however the reply is cut; two analysis messages are two lines."""
    reply = f"<|channel|>analysis<|message|>one<|end|><|start|>assistant<|channel|>analysis<|message|>two<|end|>" \
            f"<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{{}}<|call|>"
    for text, answer, reasoning, sent in ((REPLY, ANSWER, REASONING, []),
                                          (reply, "", "one\ntwo", [("functions.f", "{}")])):
        for start in range(len(text)):
            cuts = sorted({0, len(text), *range(start, len(text), pieces)})
            reader, parts = Channels(), []
            for a, b in zip(cuts, cuts[1:]):
                parts.append(reader.push(text[a:b], final=b == len(text)))
            assert "".join(p.answer for p in parts) == answer
            assert "".join(p.reasoning for p in parts) == reasoning
            assert [m for p in parts for m in p.sent] == sent



@pytest.mark.parametrize("pieces", [1, 2, 5])
def test_answer_tokens_are_the_answer_messages_tokens(pieces):
    """The tokens ``AnswerTokens`` keeps spell exactly the answer ``Channels`` reads, however the tokens come in
    pieces: not the analysis, no marker or header, no call; all of a reply that is not harmony."""
    tok = tiny_harmony_tokenizer()
    preamble = "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
    call = "<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>"
    for reply, answer in ((REPLY, ANSWER), (REPLY.replace("<|return|>", "<|end|>") + preamble + call,
                                            ANSWER + "Checking."),
                          ('{"a": 1}', '{"a": 1}'), ("<|", "<|"), ("", "")):
        ids = tok(reply, add_special_tokens=False)["input_ids"]
        texts = tok.convert_ids_to_tokens(ids)
        assert "".join(texts) == reply
        reader, kept = AnswerTokens(), []
        for at in range(0, max(len(ids), 1), pieces):
            kept += reader.push(ids[at:at + pieces], texts[at:at + pieces], final=at + pieces >= len(ids))
        assert tok.decode(kept) == answer, reply
        assert Channels().push(reply, final=True).answer == answer  # what the reply's text reads


def test_run_out_of_tokens_while_reasoning_says_so(harmony, capsys):
    assert main(["run", "tiny:llama", "-p", "Weather in Paris?", "--max-new-tokens", "20", "-q"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and "SECRET" not in err
    assert "stopped at --max-new-tokens 20 while the model was still reasoning" in err


def test_reasoning_is_dimmed_on_a_terminal():
    from ktcore.cli.reply_output import DIM, RESET, ReplyPrinter
    from ktcore.server.tiny import tiny_harmony_tokenizer

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out, err = io.StringIO(), Terminal()
    printer = ReplyPrinter(tiny_harmony_tokenizer(), show_reasoning=True, out=out, err=err)
    for cut in range(0, len(REPLY), 5):
        printer.push(REPLY[cut:cut + 5], final=cut + 5 >= len(REPLY))
    assert out.getvalue() == printer.answer == ANSWER
    assert err.getvalue().replace(DIM, "").replace(RESET, "") == REASONING + "\n"
    assert err.getvalue().startswith(DIM) and RESET in err.getvalue()
