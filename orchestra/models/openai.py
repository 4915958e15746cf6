"""OpenAICompatible: the chat-completions wire format, with tool calling, over httpx.

Speaks to anything that serves ``POST {base_url}/chat/completions``: OpenAI, Ollama, vLLM, the
llama.cpp server. This is the only module of orchestra that imports httpx, and
``orchestra.models`` loads it only when ``OpenAICompatible`` is first used.

What a call raises (all from :mod:`orchestra.errors`):

* :class:`~orchestra.errors.ModelUnavailableError`: a failure that may pass (HTTP 408, 409,
  429 or 5xx, a connection error, a timeout) outlasted every retry.
* :class:`~orchestra.errors.ModelRequestError`: any other non-2xx answer (400, 401, 403, 404,
  422, ...), raised at once: the same request would be refused again.
* :class:`~orchestra.errors.ModelResponseError`: an answer that cannot be used: a 2xx body
  that is not a chat completion, or a body that cannot be read at all (a ``Content-Encoding``
  it does not match, too many redirects, any other httpx error that is not a transport
  failure). Not retried.
* :class:`~orchestra.errors.ModelError` itself: a request that cannot be sent as built (httpx
  ``UnsupportedProtocol``, ``LocalProtocolError`` or ``InvalidURL``, e.g. a redirect to an
  ``ftp://`` URL). It carries no HTTP status, so it is not a ``ModelRequestError``, but like
  one it is permanent and raised at once. A bad ``base_url``, ``api_key`` or header is refused
  earlier, with ``ValueError`` from the constructor.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self

import anyio
import httpx

from .._logging import get_logger
from ..errors import ModelError, ModelRequestError, ModelResponseError, ModelUnavailableError
from .base import (
    ModelRequest,
    ModelResponse,
)
from .chat_format import error_detail, parse_completion, request_body

__all__ = ("OpenAICompatible",)

# retried besides every 5xx: request timeout, conflict (a lock contended on the server's
# side) and rate limit, as the OpenAI SDK does
_RETRY_STATUSES = frozenset({408, 409, 429})
# httpx failures that say the request cannot be sent as built: retrying sends it again as is
_UNSENDABLE = (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL)
_HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
# h11's field-value, within the ASCII httpx encodes str values in: no line breaks, no
# whitespace at either end
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?")


class _Transient(Exception):
    """One attempt failed in a way that may pass: 408, 409, 429, 5xx, connection error or
    timeout."""

    def __init__(self, failure: str, retry_after: float | None = None) -> None:
        super().__init__(failure)
        self.failure = failure
        self.retry_after = retry_after


class OpenAICompatible:
    """Call a chat-completions endpoint, retrying rate limits, server errors and timeouts.

    ``base_url`` is the API root, e.g. ``http://localhost:11434/v1``: an ``http://`` or
    ``https://`` URL with a host, or the constructor raises ``ValueError``. ``model`` is sent
    as the request's model and is this object's ``name``. ``api_key`` (surrounding whitespace,
    such as the newline of a key read from a file, stripped) goes in an
    ``Authorization: Bearer`` header and nowhere else: never in a log event or an error.

    Each attempt may take ``timeout`` seconds in all. A 408, 409, 429 or 5xx answer, a
    connection error or a timeout is retried up to ``max_retries`` times, after
    ``backoff * 2 ** (n - 1)`` seconds for retry *n* (capped at ``max_backoff``, scaled by a
    random factor in ``[0.5, 1]``), or after the server's ``Retry-After`` (capped the same
    way); then :class:`~orchestra.errors.ModelUnavailableError`. Any other non-2xx answer
    raises :class:`~orchestra.errors.ModelRequestError` at once; an answer that cannot be read
    (e.g. a body that does not match its ``Content-Encoding``) or a 2xx answer that is not a
    chat completion raises :class:`~orchestra.errors.ModelResponseError`; a request httpx
    cannot send as built raises :class:`~orchestra.errors.ModelError` (see the module
    docstring). None of these is retried.

    Use it as ``async with OpenAICompatible(...) as model:`` to share one connection pool
    between calls; otherwise every call opens and closes its own. A ``client`` passed in is
    used as it is and never closed here.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 20.0,
        headers: Mapping[str, str] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError(f"OpenAICompatible.timeout must be positive, got {timeout}")
        if max_retries < 0:
            raise ValueError(f"OpenAICompatible.max_retries must be at least 0, got {max_retries}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError("OpenAICompatible needs backoff >= 0 and max_backoff >= 0")
        _check_base_url(base_url)
        api_key = api_key.strip() if api_key else None
        if api_key and not _HEADER_VALUE.fullmatch(api_key):
            # the key itself stays out of the message
            raise ValueError(
                "OpenAICompatible.api_key has characters an HTTP header cannot carry "
                "(only printable ASCII is sent)"
            )
        _check_headers(headers or {})
        self.name = model
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._url = f"{self.base_url}/chat/completions"
        self._secret = api_key or None
        self._headers = {"Accept": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client = client
        self._owned: httpx.AsyncClient | None = None
        self._log: Any = None

    def __repr__(self) -> str:
        return f"OpenAICompatible(base_url={self.base_url!r}, model={self.name!r})"

    async def __aenter__(self) -> Self:
        if self._client is None:
            if self._owned is not None:
                raise RuntimeError(f"{self!r} is already open")
            self._owned = httpx.AsyncClient(timeout=self.timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client opened by ``async with``; a client passed in stays open."""
        owned, self._owned = self._owned, None
        if owned is not None:
            await owned.aclose()

    async def complete(self, request: ModelRequest) -> ModelResponse:
        """Send ``request`` as one chat completion and return the parsed answer."""
        payload = request_body(self.name, request)
        client = self._client or self._owned
        if client is not None:
            response = await self._post(client, payload)
        else:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await self._post(client, payload)
        return self._parse(request, response)

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
        """POST ``payload``, retrying what may pass; return the first 2xx response."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(client, payload)
            except _Transient as transient:
                failure = self._redact(transient.failure)
                if attempt > self.max_retries:
                    cause = transient.__cause__
                    raise ModelUnavailableError(self.name, attempt, failure) from cause
                delay = self._delay(attempt, transient.retry_after)
            self._logger().info(
                "model_call_retried",
                model=self.name,
                attempt=attempt,
                delay=round(delay, 3),
                reason=failure,
            )
            await anyio.sleep(delay)

    async def _attempt(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> httpx.Response:
        """POST once; raise _Transient for a failure worth retrying."""
        timed_out = f"no response within {self.timeout:g}s"
        # httpx's timeout bounds each phase (connect, every read) on its own, so a server
        # trickling bytes could hold an attempt far longer: the cancel scope bounds it whole
        with anyio.move_on_after(self.timeout):
            try:
                response = await client.post(
                    self._url, json=payload, headers=self._headers, timeout=self.timeout
                )
            except httpx.TimeoutException as exc:
                raise _Transient(timed_out) from exc
            except _UNSENDABLE as exc:
                # permanent, unlike the other transport errors: no HTTP status to report, so
                # a plain ModelError rather than a ModelRequestError
                raise ModelError(
                    self.name, f"the request cannot be sent: {self._describe(exc)}"
                ) from exc
            except httpx.TransportError as exc:
                raise _Transient(self._describe(exc, "connection failed")) from exc
            except httpx.HTTPError as exc:
                # the server answered, but the answer cannot be read: DecodingError (a body
                # that does not match its Content-Encoding), TooManyRedirects, ...
                raise ModelResponseError(
                    self.name, f"the response cannot be read: {self._describe(exc)}"
                ) from exc
            if response.is_success:
                return response
            status = response.status_code
            detail = self._redact(error_detail(response))
            if status not in _RETRY_STATUSES and status < 500:
                raise ModelRequestError(self.name, status, detail)
            retry_after = _retry_after(response.headers.get("Retry-After"))
            raise _Transient(f"HTTP {status}: {detail}", retry_after)
        raise _Transient(timed_out)

    def _delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        base = min(self.backoff * 2 ** (retry - 1), self.max_backoff)
        # jitter spreads the retries of many concurrent agents hitting one rate limit
        return base * (1 - 0.5 * random.random())

    def _parse(self, request: ModelRequest, response: httpx.Response) -> ModelResponse:
        try:
            return parse_completion(self.name, request, response)
        except ModelResponseError as exc:
            # a server may echo what it was sent; the key must not travel in the error
            if self._secret and self._secret in exc.detail:
                raise ModelResponseError(self.name, self._redact(exc.detail)) from None
            raise

    def _describe(self, exc: Exception, default: str = "no detail") -> str:
        return self._redact(f"{type(exc).__name__}: {str(exc) or default}")

    def _redact(self, text: str) -> str:
        return text.replace(self._secret, "[api key]") if self._secret else text

    def _logger(self) -> Any:
        if self._log is None:
            self._log = get_logger("orchestra.models")
        return self._log


def _check_base_url(base_url: str) -> None:
    """Refuse a base_url no request could be sent to: a failure retrying cannot fix."""
    example = "e.g. 'http://localhost:11434/v1'"
    try:
        url = httpx.URL(base_url)
        port = url.port
    except httpx.InvalidURL as exc:
        raise ValueError(
            f"OpenAICompatible.base_url {base_url!r} is not a valid URL ({exc}); {example}"
        ) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"OpenAICompatible.base_url must be an http:// or https:// URL with a host, "
            f"{example}; got {base_url!r}"
        )
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"OpenAICompatible.base_url {base_url!r} has port {port}, outside 1-65535")


def _check_headers(headers: Mapping[str, str]) -> None:
    """Refuse a header httpx or h11 would reject on every attempt; never quote its value,
    which may be a credential."""
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"OpenAICompatible header name {name!r} is not a valid HTTP token")
        if not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            raise ValueError(
                f"OpenAICompatible header {name!r} needs a str value of printable ASCII, "
                "without line breaks or whitespace at either end"
            )


def _retry_after(value: str | None) -> float | None:
    """Read ``Retry-After``: a number of seconds or an HTTP date; None when unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(seconds, 0.0) if math.isfinite(seconds) else None
