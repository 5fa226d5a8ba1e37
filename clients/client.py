"""Python clients for a loraplex server: :class:`LoraplexClient` (sync) and :class:`AsyncLoraplexClient`.

    from clients import LoraplexClient

    with LoraplexClient("http://127.0.0.1:8080") as client:
        print(client.generate("Hello", max_new_tokens=8).generated_text)
        for token in client.generate_stream("Hello", adapter_id="pirate"):
            print(token.text, end="", flush=True)
        summary = client.upload_adapter("path/to/peft-adapter", adapter_id="pirate", replace=True)

Every refusal raises :class:`clients.errors.LoraplexError` (status code, ``error_type``, the
server's message). ``api_key`` is sent as ``Authorization: Bearer <key>``: the admin key for
upload, delete and shrink when the server has one (it also works for everything else).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import httpx

from clients import _calls
from clients._calls import DEFAULT_TIMEOUT, DEFAULT_URL, Call, Progress, adapter_path
from clients.types import AdapterSummary, Analysis, Comparison, GenerateResult, ShrinkResult, Token


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _tokens(payload: dict[str, Any] | None) -> Token | None:
    token = (payload or {}).get("token")
    if not token or int(token.get("id", -1)) < 0:  # id -1: placeholder when nothing was generated
        return None
    return Token.from_json(token)


class LoraplexClient:
    """Blocking client (httpx). Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> httpx.Response:
        try:
            return _calls.check(self._http.request(call.method, call.path, **call.send_kwargs()))
        except httpx.TransportError as exc:
            raise _calls.unreachable(self.base_url, exc) from exc
        finally:
            call.close()

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        prompt: str,
        *,
        adapter_id: str | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] | None = None,
        details: bool = False,
        **parameters: Any,
    ) -> GenerateResult:
        """``POST /generate``; ``parameters`` are any other fields of the request's ``parameters``."""
        call = _calls.generate_call(
            prompt, stream=False, adapter_id=adapter_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, details=details, extra=parameters,
        )  # fmt: skip
        return GenerateResult.from_json(self._send(call).json())

    def generate_stream(
        self,
        prompt: str,
        *,
        adapter_id: str | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] | None = None,
        **parameters: Any,
    ) -> Iterator[Token]:
        """``POST /generate_stream``: the tokens as they are generated (leaving early cancels the request)."""
        call = _calls.generate_call(
            prompt, stream=True, adapter_id=adapter_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, details=False, extra=parameters,
        )  # fmt: skip
        try:
            with self._http.stream(call.method, call.path, **call.send_kwargs()) as response:
                if response.status_code >= 400:
                    response.read()
                    _calls.check(response)
                for line in response.iter_lines():
                    token = _tokens(_calls.sse_payload(line))
                    if token is not None:
                        yield token
        except httpx.TransportError as exc:
            raise _calls.unreachable(self.base_url, exc) from exc

    # ------------------------------------------------------------------ adapters

    def upload_adapter(
        self,
        path: str | os.PathLike[str],
        *,
        adapter_id: str | None = None,
        replace: bool = False,
        progress: Progress | None = None,
    ) -> AdapterSummary:
        """Upload a PEFT adapter directory (its two files) or an archive (.zip/.tar/.tar.gz).

        Without ``adapter_id`` the server derives one from the name. ``progress(sent, total)``
        is called as the bytes go out.
        """
        call = _calls.upload_call(path, adapter_id, replace, progress)
        return AdapterSummary.from_json(self._send(call).json())

    def iter_adapters(
        self, *, prefix: str | None = None, page_size: int = _calls.ADAPTER_PAGE
    ) -> Iterator[AdapterSummary]:
        """The stored adapters in id order (those whose id starts with ``prefix``), fetched page by
        page (``GET /adapters?limit=&cursor=``): one page in memory at a time, at any count."""
        cursor: str | None = None
        while True:
            response = self._send(_calls.adapters_page_call(prefix, cursor, page_size))
            yield from (AdapterSummary.from_json(a) for a in response.json())
            cursor = _calls.next_cursor(response)
            if cursor is None:
                return

    def list_adapters(
        self, *, prefix: str | None = None, page_size: int = _calls.ADAPTER_PAGE
    ) -> list[AdapterSummary]:
        """Every stored adapter (whose id starts with ``prefix``), read page by page."""
        return list(self.iter_adapters(prefix=prefix, page_size=page_size))

    def get_adapter(self, adapter_id: str) -> AdapterSummary:
        return AdapterSummary.from_json(self._send(Call("GET", adapter_path(adapter_id))).json())

    def delete_adapter(self, adapter_id: str) -> None:
        self._send(Call("DELETE", adapter_path(adapter_id)))

    def analysis(self, adapter_id: str, *, layers: str | None = None) -> Analysis:
        """Spectral diagnostics; ``layers`` is a regex on module names."""
        call = Call(
            "GET", adapter_path(adapter_id, "/analysis"), params={"layers": layers} if layers else None
        )
        return Analysis.from_json(self._send(call).json())

    def compare(self, a: str, b: str) -> Comparison:
        return Comparison.from_json(
            self._send(Call("GET", "/adapters/compare", params={"a": a, "b": b})).json()
        )

    def shrink(self, adapter_id: str, *, method: str, value: float, new_id: str) -> ShrinkResult:
        """Store a lower-rank copy as ``new_id`` (methods: sv_fro, sv_ratio, sv_cumulative, spn_ckpt, rank)."""
        return ShrinkResult.from_json(
            self._send(_calls.shrink_call(adapter_id, method, value, new_id)).json()
        )


class AsyncLoraplexClient:
    """The same methods as :class:`LoraplexClient`, awaitable (``generate_stream``: an async iterator)."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncLoraplexClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        try:
            return _calls.check(await self._http.request(call.method, call.path, **call.send_kwargs()))
        except httpx.TransportError as exc:
            raise _calls.unreachable(self.base_url, exc) from exc
        finally:
            call.close()

    async def generate(
        self,
        prompt: str,
        *,
        adapter_id: str | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] | None = None,
        details: bool = False,
        **parameters: Any,
    ) -> GenerateResult:
        call = _calls.generate_call(
            prompt, stream=False, adapter_id=adapter_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, details=details, extra=parameters,
        )  # fmt: skip
        return GenerateResult.from_json((await self._send(call)).json())

    async def generate_stream(
        self,
        prompt: str,
        *,
        adapter_id: str | None = None,
        max_new_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Iterable[str] | None = None,
        **parameters: Any,
    ) -> AsyncIterator[Token]:
        call = _calls.generate_call(
            prompt, stream=True, adapter_id=adapter_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, top_k=top_k, seed=seed, stop=stop, details=False, extra=parameters,
        )  # fmt: skip
        try:
            async with self._http.stream(call.method, call.path, **call.send_kwargs()) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _calls.check(response)
                async for line in response.aiter_lines():
                    token = _tokens(_calls.sse_payload(line))
                    if token is not None:
                        yield token
        except httpx.TransportError as exc:
            raise _calls.unreachable(self.base_url, exc) from exc

    async def upload_adapter(
        self,
        path: str | os.PathLike[str],
        *,
        adapter_id: str | None = None,
        replace: bool = False,
        progress: Progress | None = None,
    ) -> AdapterSummary:
        call = _calls.upload_call(path, adapter_id, replace, progress)
        return AdapterSummary.from_json((await self._send(call)).json())

    async def iter_adapters(
        self, *, prefix: str | None = None, page_size: int = _calls.ADAPTER_PAGE
    ) -> AsyncIterator[AdapterSummary]:
        """The stored adapters in id order (whose id starts with ``prefix``), fetched page by page."""
        cursor: str | None = None
        while True:
            response = await self._send(_calls.adapters_page_call(prefix, cursor, page_size))
            for item in response.json():
                yield AdapterSummary.from_json(item)
            cursor = _calls.next_cursor(response)
            if cursor is None:
                return

    async def list_adapters(
        self, *, prefix: str | None = None, page_size: int = _calls.ADAPTER_PAGE
    ) -> list[AdapterSummary]:
        """Every stored adapter (whose id starts with ``prefix``), read page by page."""
        return [a async for a in self.iter_adapters(prefix=prefix, page_size=page_size)]

    async def get_adapter(self, adapter_id: str) -> AdapterSummary:
        return AdapterSummary.from_json((await self._send(Call("GET", adapter_path(adapter_id)))).json())

    async def delete_adapter(self, adapter_id: str) -> None:
        await self._send(Call("DELETE", adapter_path(adapter_id)))

    async def analysis(self, adapter_id: str, *, layers: str | None = None) -> Analysis:
        call = Call(
            "GET", adapter_path(adapter_id, "/analysis"), params={"layers": layers} if layers else None
        )
        return Analysis.from_json((await self._send(call)).json())

    async def compare(self, a: str, b: str) -> Comparison:
        call = Call("GET", "/adapters/compare", params={"a": a, "b": b})
        return Comparison.from_json((await self._send(call)).json())

    async def shrink(self, adapter_id: str, *, method: str, value: float, new_id: str) -> ShrinkResult:
        call = _calls.shrink_call(adapter_id, method, value, new_id)
        return ShrinkResult.from_json((await self._send(call)).json())
