"""OpenAICompatible against a real HTTP server on loopback: wire format, parsing, retries,
errors and the client's lifecycle."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import httpx
import pytest

from orchestra.errors import (
    ModelError,
    ModelRequestError,
    ModelResponseError,
    ModelUnavailableError,
)
from orchestra.models import Message, ModelRequest, TokenUsage, ToolCall, ToolSpec
from orchestra.models.openai import OpenAICompatible

pytestmark = pytest.mark.anyio

API_KEY = "sk-test-0123456789abcdef"
HELLO = ModelRequest(messages=(Message(role="user", content="hello", name="user"),))


@dataclass(frozen=True)
class Reply:
    """One scripted answer: a dict or list is sent as JSON, a string as it is."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request as the server saw it (header names lower-cased)."""

    path: str
    headers: dict[str, str]
    body: Any
    port: int


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread
    fake: FakeServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that timed out has hung up; that is the point of the test, not an error
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive, so connection reuse can be observed
    timeout = 5  # an idle keep-alive connection cannot hold teardown longer

    def do_POST(self) -> None:
        fake = self.server.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = fake.take(Received(self.path, headers, body, self.client_address[1]))
        if reply.delay:
            fake.stopping.wait(reply.delay)
        data = (reply.body if isinstance(reply.body, str) else json.dumps(reply.body)).encode()
        try:
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class FakeServer:
    """A chat-completions server on 127.0.0.1 that answers from a script of replies."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.received: list[Received] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def take(self, received: Received) -> Reply:
        with self._lock:
            self.received.append(received)
            if self.replies:
                return self.replies.popleft()
        return Reply(500, {"error": {"message": "the test scripted no more replies"}})

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    """Serve scripted replies on a free loopback port for one test."""
    fake = FakeServer()
    fake.start()
    yield fake
    fake.close()


def completion(
    text: str | None = "hi",
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    usage: dict[str, int] | None = None,
    finish_reason: str = "stop",
    model: str = "served-model",
) -> dict[str, Any]:
    """Build a chat-completions response body."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def wire_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def make_model(server: FakeServer, **options: Any) -> OpenAICompatible:
    options = {"backoff": 0.001, "max_backoff": 0.01, "timeout": 5.0, **options}
    return OpenAICompatible(server.url, "test-model", **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- answers ------------------------------------------------------------------------------


async def test_openai_returns_the_text_answer(server: FakeServer) -> None:
    """A plain answer becomes the response text, with no tool calls."""
    server.script(Reply(body=completion("Hello there")))
    response = await make_model(server).complete(HELLO)
    assert response.text == "Hello there"
    assert response.tool_calls == ()


async def test_openai_reads_model_and_finish_reason(server: FakeServer) -> None:
    """The served model name and the finish reason are taken from the response."""
    server.script(Reply(body=completion(finish_reason="length", model="llama3.2:3b")))
    response = await make_model(server).complete(HELLO)
    assert (response.model, response.finish_reason) == ("llama3.2:3b", "length")


async def test_openai_parses_tool_call_arguments(server: FakeServer) -> None:
    """Tool calls keep their ids and names, with the JSON arguments parsed to dicts."""
    calls = [
        wire_call("call_1", "search", '{"query": "anyio", "limit": 3}'),
        wire_call("call_2", "now", "{}"),
    ]
    server.script(Reply(body=completion(None, tool_calls=calls, finish_reason="tool_calls")))
    response = await make_model(server).complete(HELLO)
    assert response.text is None
    assert response.tool_calls == (
        ToolCall(id="call_1", name="search", arguments={"query": "anyio", "limit": 3}),
        ToolCall(id="call_2", name="now", arguments={}),
    )
    assert response.finish_reason == "tool_calls"


@pytest.mark.parametrize("arguments", ['{"query": "anyio"', "[1, 2]", '"text"'])
async def test_openai_keeps_arguments_that_are_not_an_object_raw(
    server: FakeServer, arguments: str
) -> None:
    """Arguments that are not a JSON object are kept as the raw string, not raised."""
    server.script(Reply(body=completion(None, tool_calls=[wire_call("c", "search", arguments)])))
    response = await make_model(server).complete(HELLO)
    assert response.tool_calls == (ToolCall(id="c", name="search", arguments=arguments),)


async def test_openai_reads_empty_arguments_as_no_arguments(server: FakeServer) -> None:
    """An empty arguments string (a tool without parameters) parses to an empty dict."""
    server.script(Reply(body=completion(None, tool_calls=[wire_call("c", "now", "")])))
    response = await make_model(server).complete(HELLO)
    assert response.tool_calls == (ToolCall(id="c", name="now", arguments={}),)


async def test_openai_accepts_the_legacy_function_call(server: FakeServer) -> None:
    """The older single ``function_call`` shape becomes one tool call without an id."""
    body = completion(None)
    body["choices"][0]["message"]["function_call"] = {"name": "now", "arguments": '{"tz": "UTC"}'}
    server.script(Reply(body=body))
    response = await make_model(server).complete(HELLO)
    assert response.tool_calls == (ToolCall(name="now", arguments={"tz": "UTC"}),)


async def test_openai_reads_token_usage(server: FakeServer) -> None:
    """prompt_tokens and completion_tokens become the response's token usage."""
    usage = {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}
    server.script(Reply(body=completion(usage=usage)))
    response = await make_model(server).complete(HELLO)
    assert response.usage == TokenUsage(input_tokens=21, output_tokens=5)


async def test_openai_estimates_usage_the_server_does_not_report(server: FakeServer) -> None:
    """Without a usage object the tokens are estimated, never zero (budgets still count)."""
    server.script(Reply(body=completion("a reply of some length")))
    response = await make_model(server).complete(HELLO)
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0


# --- the request sent ---------------------------------------------------------------------


async def test_openai_sends_the_whole_conversation(server: FakeServer) -> None:
    """Messages, tool calls, tool results, tools and sampling options go out in wire format."""
    request = ModelRequest(
        messages=(
            Message(role="system", content="Be brief.", name="system"),
            Message(role="user", content="Weather in Oslo?", name="user"),
            Message(
                role="assistant",
                name="planner",
                tool_calls=(ToolCall(id="call_1", name="weather", arguments={"city": "Oslo"}),),
            ),
            Message(role="tool", content="-3C", name="weather", tool_call_id="call_1"),
        ),
        tools=(
            ToolSpec(
                name="weather",
                description="Current weather.",
                parameters={"type": "object", "properties": {"city": {"type": "string"}}},
            ),
        ),
        max_tokens=64,
        temperature=0.2,
        stop=("\n\n",),
        agent="planner",
    )
    server.script(Reply(body=completion()))
    await make_model(server).complete(request)
    assert server.received[0].path == "/v1/chat/completions"
    assert server.received[0].body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "content": "-3C", "tool_call_id": "call_1"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Current weather.",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "stop": ["\n\n"],
    }


async def test_openai_omits_options_that_are_not_set(server: FakeServer) -> None:
    """A bare request sends only the model and the messages."""
    server.script(Reply(body=completion()))
    await make_model(server).complete(HELLO)
    assert server.received[0].body == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "hello"}],
    }


async def test_openai_sends_a_zero_temperature(server: FakeServer) -> None:
    """temperature=0.0 is a setting, not a missing value: it is sent."""
    server.script(Reply(body=completion()))
    await make_model(server).complete(HELLO.model_copy(update={"temperature": 0.0}))
    assert server.received[0].body["temperature"] == 0.0


async def test_openai_sends_raw_arguments_back_verbatim(server: FakeServer) -> None:
    """A tool call whose arguments stayed raw text is sent back exactly as the model wrote it."""
    call = ToolCall(id="c", name="search", arguments='{"query": ')
    request = ModelRequest(
        messages=(*HELLO.messages, Message(role="assistant", tool_calls=(call,)))
    )
    server.script(Reply(body=completion()))
    await make_model(server).complete(request)
    sent = server.received[0].body["messages"][1]["tool_calls"][0]
    assert sent["function"]["arguments"] == '{"query": '


async def test_openai_sends_the_api_key_as_a_bearer_token(server: FakeServer) -> None:
    """The API key goes in the Authorization header."""
    server.script(Reply(body=completion()))
    await make_model(server, api_key=API_KEY).complete(HELLO)
    assert server.received[0].headers["authorization"] == f"Bearer {API_KEY}"


async def test_openai_sends_no_authorization_without_a_key(server: FakeServer) -> None:
    """Without an API key no Authorization header is sent (local servers need none)."""
    server.script(Reply(body=completion()))
    await make_model(server).complete(HELLO)
    assert "authorization" not in server.received[0].headers


async def test_openai_sends_extra_headers(server: FakeServer) -> None:
    """Headers given to the constructor are sent with every request."""
    server.script(Reply(body=completion()))
    await make_model(server, headers={"X-Project": "orchestra"}).complete(HELLO)
    assert server.received[0].headers["x-project"] == "orchestra"


async def test_openai_strips_a_trailing_slash_from_the_base_url(server: FakeServer) -> None:
    """base_url may end in a slash; the path is still /v1/chat/completions."""
    server.script(Reply(body=completion()))
    model = OpenAICompatible(server.url + "/", "test-model")
    await model.complete(HELLO)
    assert server.received[0].path == "/v1/chat/completions"


# --- retries ------------------------------------------------------------------------------


async def test_openai_retries_a_rate_limit_after_retry_after(server: FakeServer) -> None:
    """A 429 is retried after the server's Retry-After, not the (here huge) backoff."""
    server.script(
        Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0"}),
        Reply(body=completion("after the wait")),
    )
    model = make_model(server, backoff=30.0, max_backoff=30.0)
    with anyio.fail_after(5):
        response = await model.complete(HELLO)
    assert response.text == "after the wait"
    assert len(server.received) == 2


async def test_openai_reads_retry_after_as_an_http_date(server: FakeServer) -> None:
    """A Retry-After given as an HTTP date (here already past) is honoured too."""
    past = formatdate(time.time() - 60, usegmt=True)
    server.script(Reply(503, "busy", headers={"Retry-After": past}), Reply(body=completion()))
    model = make_model(server, backoff=30.0, max_backoff=30.0)
    with anyio.fail_after(5):
        await model.complete(HELLO)
    assert len(server.received) == 2


async def test_openai_caps_retry_after_at_max_backoff(server: FakeServer) -> None:
    """A Retry-After longer than max_backoff waits only max_backoff."""
    server.script(Reply(429, "later", headers={"Retry-After": "3600"}), Reply(body=completion()))
    with anyio.fail_after(5):
        await make_model(server, max_backoff=0.01).complete(HELLO)
    assert len(server.received) == 2


@pytest.mark.parametrize("status", [408, 409])
async def test_openai_retries_request_timeout_and_conflict(server: FakeServer, status: int) -> None:
    """A 408 or a 409 is retried like a 429 or a 5xx (as the OpenAI SDK does)."""
    server.script(Reply(status, {"error": {"message": "try again"}}), Reply(body=completion("ok")))
    response = await make_model(server).complete(HELLO)
    assert response.text == "ok"
    assert len(server.received) == 2


async def test_openai_gives_up_on_server_errors_after_max_retries(server: FakeServer) -> None:
    """Repeated 5xx answers raise ModelUnavailableError after max_retries retries."""
    server.script(*[Reply(500, {"error": {"message": "overloaded"}})] * 3)
    with pytest.raises(ModelUnavailableError) as caught:
        await make_model(server, max_retries=2).complete(HELLO)
    assert caught.value.attempts == 3
    assert "HTTP 500: overloaded" in str(caught.value)
    assert len(server.received) == 3


async def test_openai_does_not_retry_when_max_retries_is_zero(server: FakeServer) -> None:
    """max_retries=0 makes exactly one attempt."""
    server.script(Reply(502, "bad gateway"))
    with pytest.raises(ModelUnavailableError) as caught:
        await make_model(server, max_retries=0).complete(HELLO)
    assert caught.value.attempts == 1
    assert len(server.received) == 1


async def test_openai_retries_a_timeout_then_gives_up(server: FakeServer) -> None:
    """A server slower than the timeout is retried, then reported unavailable."""
    server.script(Reply(body=completion(), delay=2.0), Reply(body=completion(), delay=2.0))
    model = make_model(server, timeout=0.2, max_retries=1)
    start = time.monotonic()
    with pytest.raises(ModelUnavailableError) as caught:
        await model.complete(HELLO)
    assert time.monotonic() - start < 1.5
    assert caught.value.attempts == 2
    assert "no response within 0.2s" in str(caught.value)
    assert len(server.received) == 2


async def test_openai_reports_a_refused_connection_as_unavailable() -> None:
    """Nothing listening on the port: every attempt fails, then ModelUnavailableError."""
    model = OpenAICompatible(
        f"http://127.0.0.1:{free_port()}/v1", "test-model", max_retries=1, backoff=0.001
    )
    with pytest.raises(ModelUnavailableError) as caught:
        await model.complete(HELLO)
    assert caught.value.attempts == 2
    assert "ConnectError" in str(caught.value)


# --- errors that are not retried ----------------------------------------------------------


async def test_openai_raises_a_client_error_at_once(server: FakeServer) -> None:
    """A 400 raises ModelRequestError with the server's message, after one request."""
    server.script(Reply(400, {"error": {"message": "unknown model 'test-model'"}}))
    with pytest.raises(ModelRequestError) as caught:
        await make_model(server).complete(HELLO)
    assert caught.value.status == 400
    assert "unknown model 'test-model'" in str(caught.value)
    assert len(server.received) == 1


async def test_openai_truncates_a_long_error_body(server: FakeServer) -> None:
    """A raw-text error body is quoted, cut to about 500 characters."""
    server.script(Reply(404, "x" * 5000))
    with pytest.raises(ModelRequestError) as caught:
        await make_model(server).complete(HELLO)
    assert "xxxx" in caught.value.detail
    assert len(caught.value.detail) < 600


# httpx leaves its body-stream async generators unclosed when decoding fails, which trio
# reports at garbage collection (encode/httpx#3686); nothing of ours is left open
@pytest.mark.filterwarnings("ignore:Async generator 'httpx\\.:ResourceWarning")
async def test_openai_reports_an_undecodable_body_as_a_response_error(server: FakeServer) -> None:
    """A body that does not match its Content-Encoding raises ModelResponseError, not httpx's
    DecodingError, and is not retried."""
    server.script(Reply(200, "not gzip at all", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(ModelResponseError, match="cannot be read: DecodingError"):
        await make_model(server).complete(HELLO)
    assert len(server.received) == 1


async def test_openai_does_not_retry_a_request_that_cannot_be_sent(server: FakeServer) -> None:
    """A redirect to a scheme httpx cannot speak (UnsupportedProtocol) is permanent: a
    ModelError at once, not retried as if the connection had failed."""
    server.script(*[Reply(307, "", headers={"Location": "ftp://127.0.0.1/v1"})] * 3)
    async with httpx.AsyncClient(follow_redirects=True) as client:
        model = make_model(server, client=client, max_retries=2)
        with pytest.raises(ModelError, match="cannot be sent: UnsupportedProtocol") as caught:
            await model.complete(HELLO)
    assert type(caught.value) is ModelError
    assert len(server.received) == 1


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ("<html>gateway</html>", "not JSON"),
        ([1, 2], "not an object"),
        ({"object": "chat.completion"}, "no choices"),
        ({"choices": []}, "no choices"),
        ({"choices": [{"index": 0}]}, "choices[0].message"),
        ({"choices": [{"message": {"tool_calls": [{"id": "c"}]}}]}, "tool_calls[0]"),
    ],
)
async def test_openai_rejects_a_malformed_completion(
    server: FakeServer, body: Any, missing: str
) -> None:
    """A 2xx answer that is not a chat completion raises ModelResponseError naming the gap."""
    server.script(Reply(200, body))
    with pytest.raises(ModelResponseError, match=re.escape(missing)):
        await make_model(server).complete(HELLO)
    assert len(server.received) == 1


async def test_openai_quotes_an_error_object_sent_with_200(server: FakeServer) -> None:
    """A 200 carrying an error object instead of choices reports the server's message."""
    server.script(Reply(200, {"error": {"message": "context length exceeded"}}))
    with pytest.raises(ModelResponseError, match="context length exceeded"):
        await make_model(server).complete(HELLO)


@pytest.mark.parametrize(
    "reply",
    [
        Reply(401, {"error": {"message": f"Incorrect API key provided: {API_KEY}"}}),
        Reply(500, f"crashed while handling Bearer {API_KEY}"),
        Reply(200, f"<p>bad token {API_KEY}</p>"),
    ],
    ids=["request", "unavailable", "response"],
)
async def test_openai_never_puts_the_api_key_in_an_error(server: FakeServer, reply: Reply) -> None:
    """Even when the server echoes the key, the raised error does not contain it."""
    server.script(reply)
    with pytest.raises((ModelRequestError, ModelUnavailableError, ModelResponseError)) as caught:
        await make_model(server, api_key=API_KEY, max_retries=0).complete(HELLO)
    assert API_KEY not in str(caught.value)
    assert API_KEY not in repr(caught.value)


def test_openai_repr_does_not_show_the_api_key() -> None:
    """repr() names the endpoint and the model, never the key."""
    model = OpenAICompatible("http://127.0.0.1:1/v1", "m", API_KEY)
    assert API_KEY not in repr(model)
    assert "'m'" in repr(model)


# --- lifecycle ----------------------------------------------------------------------------


async def test_openai_async_with_reuses_one_connection(server: FakeServer) -> None:
    """Inside ``async with`` every call goes over the one pooled connection."""
    server.script(Reply(body=completion("one")), Reply(body=completion("two")))
    async with make_model(server) as model:
        first = await model.complete(HELLO)
        second = await model.complete(HELLO)
    assert (first.text, second.text) == ("one", "two")
    assert len({received.port for received in server.received}) == 1


async def test_openai_without_async_with_opens_a_client_per_call(server: FakeServer) -> None:
    """Used bare, each call opens (and closes) its own connection."""
    server.script(Reply(body=completion()), Reply(body=completion()))
    model = make_model(server)
    await model.complete(HELLO)
    await model.complete(HELLO)
    assert len({received.port for received in server.received}) == 2


async def test_openai_uses_a_given_client_and_leaves_it_open(server: FakeServer) -> None:
    """A client passed in serves every call and is still open after ``async with``."""
    server.script(Reply(body=completion()), Reply(body=completion()))
    async with httpx.AsyncClient() as client:
        async with make_model(server, client=client) as model:
            await model.complete(HELLO)
        await model.complete(HELLO)
        assert not client.is_closed
    assert len({received.port for received in server.received}) == 1


async def test_openai_can_be_opened_again_after_closing(server: FakeServer) -> None:
    """After ``async with`` ends, the same model can be opened again."""
    server.script(Reply(body=completion("one")), Reply(body=completion("two")))
    model = make_model(server)
    async with model:
        await model.complete(HELLO)
    async with model:
        response = await model.complete(HELLO)
    assert response.text == "two"


async def test_openai_refuses_to_open_twice(server: FakeServer) -> None:
    """Entering ``async with`` on a model that is already open is an error."""
    async with make_model(server) as model:
        with pytest.raises(RuntimeError, match="already open"):
            await model.__aenter__()


def test_openai_is_named_after_its_model() -> None:
    """The model's name is the model it asks for."""
    assert OpenAICompatible("http://127.0.0.1:1/v1", "gpt-4o-mini").name == "gpt-4o-mini"


@pytest.mark.parametrize(
    "options",
    [{"timeout": 0}, {"max_retries": -1}, {"backoff": -1.0}, {"max_backoff": -1.0}],
    ids=["timeout", "max_retries", "backoff", "max_backoff"],
)
def test_openai_rejects_bad_settings(options: dict[str, Any]) -> None:
    """A non-positive timeout or a negative retry setting is refused at construction."""
    with pytest.raises(ValueError, match="OpenAICompatible"):
        OpenAICompatible("http://127.0.0.1:1/v1", "m", **options)


@pytest.mark.parametrize(
    ("base_url", "why"),
    [
        ("127.0.0.1:8000/v1", "http:// or https://"),
        ("localhost:11434/v1", "http:// or https://"),
        ("ftp://127.0.0.1/v1", "http:// or https://"),
        ("http:///v1", "with a host"),
        ("http://[::1/v1", "not a valid URL"),
        ("http://127.0.0.1:99999/v1", "outside 1-65535"),
    ],
)
def test_openai_rejects_a_base_url_it_could_never_reach(base_url: str, why: str) -> None:
    """A base_url without an http(s) scheme, a host or a valid port is refused at
    construction, not retried at every call."""
    with pytest.raises(ValueError, match=re.escape(why)):
        OpenAICompatible(base_url, "m")


@pytest.mark.parametrize(
    "options",
    [
        {"api_key": "sk-SECRET\u2019"},
        {"headers": {"X-Token": "SECRET\n"}},
        {"headers": {"Bad Name": "SECRET"}},
    ],
    ids=["api_key", "header_value", "header_name"],
)
def test_openai_rejects_headers_it_could_never_send(options: dict[str, Any]) -> None:
    """A key or header httpx could not send is refused at construction, without quoting it."""
    with pytest.raises(ValueError, match="OpenAICompatible") as caught:
        OpenAICompatible("http://127.0.0.1:1/v1", "m", **options)
    assert "SECRET" not in str(caught.value)


async def test_openai_strips_whitespace_around_the_api_key(server: FakeServer) -> None:
    """A key read from a file with its trailing newline is sent without it (h11 would refuse
    the header, and its message would quote the key)."""
    server.script(Reply(body=completion()))
    await make_model(server, api_key=f"{API_KEY}\n").complete(HELLO)
    assert server.received[0].headers["authorization"] == f"Bearer {API_KEY}"


def test_openai_satisfies_the_model_protocol() -> None:
    """OpenAICompatible is a Model."""
    from orchestra.models import Model

    assert isinstance(OpenAICompatible("http://127.0.0.1:1/v1", "m"), Model)


def test_openai_is_exported_lazily_by_orchestra_models() -> None:
    """orchestra.models.OpenAICompatible is this class, loaded on first use."""
    import orchestra.models

    assert orchestra.models.OpenAICompatible is OpenAICompatible


def test_openai_import_of_orchestra_models_stays_light() -> None:
    """import orchestra.models does not import httpx; only using OpenAICompatible does."""
    code = "import sys, orchestra.models; print('httpx' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
