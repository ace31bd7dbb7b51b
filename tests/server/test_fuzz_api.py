"""Property-based fuzzing of the whole HTTP API with schemathesis, from the OpenAPI schema the server itself
serves: whatever generated request comes, the reply is never a 5xx, and the server stays up.

Each operation gets requests that fit its schema and requests that do not (schemathesis' positive and
negative modes), half of them aimed at real objects (the served model's name, ids of an existing
assistant, thread, message and run) so that they get past the 404s into the routes. Bounded: a few examples
per operation, and a 64-token context so that the requests that do generate end quickly."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402

from ktcore.server.app import create_app  # noqa: E402
from ktcore.server.engine import Engine  # noqa: E402
from ktcore.server.runner import ServerThread  # noqa: E402

EXAMPLES_PER_OPERATION = 60


@pytest.fixture(scope="module")
def fuzzed(tiny, tmp_path_factory):
    model, tokenizer, info = tiny
    engine = Engine(model, tokenizer, max_context=64, max_concurrency=4)
    db = tmp_path_factory.mktemp("fuzz-db") / "assistants.sqlite3"
    srv = ServerThread(create_app(engine, tokenizer, info, db_path=db)).start()
    yield srv
    srv.stop()


def _real_objects(url: str, model: str) -> dict:
    with httpx.Client(base_url=url, timeout=60) as http:
        assistant = http.post("/v1/assistants", json={"model": model}).json()
        thread = http.post("/v1/threads", json={"messages": [{"role": "user", "content": "hi"}]}).json()
        message = http.get(f"/v1/threads/{thread['id']}/messages").json()["data"][0]
        run = http.post(f"/v1/threads/{thread['id']}/runs", json={"assistant_id": assistant["id"],
                                                                  "max_completion_tokens": 2}).json()
    return {"assistant_id": assistant["id"], "thread_id": thread["id"], "message_id": message["id"],
            "run_id": run["id"], "model_id": model}


def test_no_request_gets_a_server_error(fuzzed, model_name):
    api = schemathesis.openapi.from_url(fuzzed.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) > 30  # every route of the three API families is in the schema
    real = _real_objects(fuzzed.url, model_name)
    seen = []

    for operation in operations:
        names = [p.name for p in operation.path_parameters]
        aimed = {name: real[name] for name in names if name in real}
        cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                          operation.as_strategy(GenerationMode.NEGATIVE),
                          st.tuples(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=aimed),
                                    st.just(True)),
                          st.tuples(operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=aimed),
                                    st.just(True)))

        @given(drawn=cases)
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def no_server_error(drawn):
            case, at_real = drawn if isinstance(drawn, tuple) else (drawn, False)
            if at_real and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
                case.body["model"] = model_name
            response = case.call(timeout=60)
            seen.append(response.status_code)
            assert response.status_code < 500, (f"{case.method} {case.formatted_path} -> {response.status_code}: "
                                                f"{response.text[:500]}\n{case.as_curl_command()}")

        no_server_error()

    assert len(seen) > 10 * len(operations) and sum(s == 200 for s in seen) > len(operations)
    assert httpx.get(fuzzed.url + "/health", timeout=30).json()["status"] == "ok"  # still up after all of it
