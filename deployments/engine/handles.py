"""The caller's side of one request on the engine: a handle to stream, await or cancel it.

The engine's loop thread pushes events (text deltas, the end, or an error); a caller on an
asyncio loop gets them through its own loop (`call_soon_threadsafe`), any other caller through a
thread-safe queue. Events are `GenerationChunk`s: every delta carries `prompt_tokens`, the last
one `finish_reason` and `completion_tokens`.
"""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import AsyncIterator, Iterator

from deployments.contracts import CombinationKind, FinishReason, GenerationChunk, SamplingParams

__all__ = ["RequestHandle"]


class RequestHandle:
    """What `Engine.submit` returns: iterate (sync or async) for chunks, or `result()` / `aresult()`.

    `params.max_tokens` is resolved (never None): the engine fills in what the prompt leaves room for.
    """

    def __init__(self, adapter_id: str | None, prompt_ids: list[int], params: SamplingParams,
                 tenant: str | None = None) -> None:
        self.adapter_id = adapter_id
        self.tenant = tenant
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted_s = time.monotonic()
        self.combination: CombinationKind | None = None  # set at admission for a combination request
        self._cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_events: asyncio.Queue | None = None
        try:
            self._loop = asyncio.get_running_loop()
            self._async_events = asyncio.Queue()
        except RuntimeError:
            pass

    def cancel(self) -> None:
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # ---- the engine's side (loop thread) ----------------------------------------------------------

    def emit(self, text: str) -> None:
        self._push(GenerationChunk(text, None, len(self.prompt_ids), 0, self.adapter_id, self.combination))

    def finish(self, reason: FinishReason, completion_tokens: int) -> None:
        self._push(GenerationChunk("", reason, len(self.prompt_ids), completion_tokens, self.adapter_id, self.combination))

    def fail(self, error: BaseException) -> None:
        self._push(error)

    def _push(self, event: GenerationChunk | BaseException) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
        else:
            self._events.put(event)

    # ---- the caller's side --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[GenerationChunk]:
        while True:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[GenerationChunk]:
        if self._async_events is None:
            raise RuntimeError("this request was submitted outside an event loop; iterate it synchronously")
        while True:
            event = await self._async_events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if event.finish_reason is not None:
                return

    def result(self) -> GenerationChunk:
        """The whole text, once the request has finished."""
        return _whole(list(self))

    async def aresult(self) -> GenerationChunk:
        return _whole([chunk async for chunk in self.stream()])


def _whole(chunks: list[GenerationChunk]) -> GenerationChunk:
    last = chunks[-1]
    return GenerationChunk(
        text="".join(chunk.text for chunk in chunks),
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        adapter_id=last.adapter_id,
        combination=last.combination,
    )
