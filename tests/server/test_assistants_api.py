"""OpenAI Assistants API driven with the official ``openai`` client (beta namespace)."""

from __future__ import annotations


import pytest

openai = pytest.importorskip("openai", reason="pip install openai")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # OpenAI deprecated the Assistants API


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def assistant(client, model_name):
    return client.beta.assistants.create(model=model_name, name="helper", instructions="Answer in one word.",
                                         temperature=0)


def test_assistant_crud(client, model_name, assistant):
    got = client.beta.assistants.retrieve(assistant.id)
    assert (got.name, got.instructions, got.model) == ("helper", "Answer in one word.", model_name)
    updated = client.beta.assistants.update(assistant.id, name="renamed", metadata={"k": "v"})
    assert updated.name == "renamed" and updated.metadata == {"k": "v"}
    other = client.beta.assistants.create(model=model_name, name="second")
    listed = client.beta.assistants.list(order="asc")
    ids = [a.id for a in listed.data]
    assert ids.index(assistant.id) < ids.index(other.id)
    assert client.beta.assistants.delete(other.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.beta.assistants.retrieve(other.id)
    with pytest.raises(openai.NotFoundError):
        client.beta.assistants.create(model="not-served")


def test_thread_messages_and_polled_run(client, assistant, tokenizer):
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "First question"}])
    client.beta.threads.messages.create(thread.id, role="user", content="Second question")
    run = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                   max_completion_tokens=12, poll_interval_ms=50)
    assert run.status in ("completed", "incomplete")
    assert run.usage.completion_tokens <= 12
    # the prompt is the assistant's instructions as system message, then the thread in order
    from ktcore.server.common import chat_prompt_ids

    expected = chat_prompt_ids(tokenizer, [{"role": "system", "content": "Answer in one word."},
                                           {"role": "user", "content": "First question"},
                                           {"role": "user", "content": "Second question"}])
    assert run.usage.prompt_tokens == len(expected)
    messages = client.beta.threads.messages.list(thread.id, order="asc").data
    assert [m.role for m in messages] == ["user", "user", "assistant"]
    reply = messages[-1]
    assert reply.run_id == run.id and reply.assistant_id == assistant.id
    assert reply.content[0].text.value
    assert [r.id for r in client.beta.threads.runs.list(thread.id).data] == [run.id]
    assert client.beta.threads.runs.retrieve(run.id, thread_id=thread.id).status == run.status


def test_streaming_run_matches_stored_message(client, assistant):
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "Hello there"}])
    events = list(client.beta.threads.runs.create(thread_id=thread.id, assistant_id=assistant.id, stream=True,
                                                  max_completion_tokens=15))
    names = [e.event for e in events]
    assert names[0] == "thread.run.created" and names[-1] in ("thread.run.completed", "thread.run.incomplete")
    assert "thread.message.created" in names and "thread.message.delta" in names
    streamed = "".join(e.data.delta.content[0].text.value for e in events if e.event == "thread.message.delta")
    stored = client.beta.threads.messages.list(thread.id, order="desc", limit=1).data[0]
    assert stored.content[0].text.value == streamed
    # the helper of the client library understands the stream too
    thread2 = client.beta.threads.create(messages=[{"role": "user", "content": "Hello there"}])
    with client.beta.threads.runs.stream(thread_id=thread2.id, assistant_id=assistant.id,
                                         max_completion_tokens=15) as stream:
        text = "".join(stream.text_deltas)
    assert text == streamed  # temperature 0: same prompt, same reply


def test_a_run_continues_the_conversation(client, assistant):
    thread = client.beta.threads.create(messages=[{"role": "user", "content": "one"}])
    first = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                     max_completion_tokens=5, poll_interval_ms=50)
    client.beta.threads.messages.create(thread.id, role="user", content="two")
    second = client.beta.threads.runs.create_and_poll(thread_id=thread.id, assistant_id=assistant.id,
                                                      max_completion_tokens=5, poll_interval_ms=50)
    # the second prompt holds the first exchange: more prompt tokens than the first prompt plus its reply
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_errors_in_openai_schema(client, assistant, server):
    import httpx

    with pytest.raises(openai.NotFoundError):
        client.beta.threads.retrieve("thread_missing")
    thread = client.beta.threads.create()
    with pytest.raises(openai.NotFoundError):
        client.beta.threads.runs.create(thread_id=thread.id, assistant_id="asst_missing")
    r = httpx.post(f"{server.url}/v1/threads/{thread.id}/messages", json={"role": "wizard", "content": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "role"


def test_create_thread_and_run_is_reachable(client, assistant):
    """POST /v1/threads/runs was once taken by POST /v1/threads/{thread_id} (as the thread id "runs")."""
    run = client.beta.threads.create_and_run(assistant_id=assistant.id, max_completion_tokens=4,
                                             thread={"messages": [{"role": "user", "content": "Hi"}]})
    assert run.object == "thread.run" and run.assistant_id == assistant.id
    assert client.beta.threads.retrieve(run.thread_id).id == run.thread_id
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.beta.threads.create_and_run(assistant_id=assistant.id, tools=[{"type": "code_interpreter"}])
