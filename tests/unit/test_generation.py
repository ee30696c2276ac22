"""Streaming from `server/generation.py` without a server: outputs that queue up while a
stream is behind leave as one event per choice (one SSE chunk), in order, with nothing lost;
an error after some outputs still delivers them first."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from minisgl.messages import ErrorOut, TextOut
from minisgl.server.bridge import ReqHandle
from minisgl.server.generation import ApiError, Generation


class FakeBridge:
    def __init__(self) -> None:
        self.args = SimpleNamespace(max_running_requests=64, request_timeout=0, max_choices=8,
                                    max_waiting_requests=64)  # fmt: skip
        self.queued, self.aborted = 0, []

    def submit(self, queue: asyncio.Queue, index: int, *_a: object) -> ReqHandle:
        return ReqHandle(index, index, queue, 0)

    def abort(self, h: ReqHandle, reason: str = "abort") -> None:
        self.aborted.append((h.uid, reason))


def out(uid: int, text: str, finished: str | None = None) -> TextOut:
    return TextOut(uid, text, [len(text)], finished, [], 0, 3)


async def _events(msgs: list[tuple[int, object]], n: int = 1, late: list | None = None) -> list:
    gen = Generation(FakeBridge())
    for _ in range(n):
        gen.add(0, "p", {}, [], False)
    for m in msgs[:n]:
        gen.queue.put_nowait(m)
    await gen.start()
    for m in msgs[n:]:
        gen.queue.put_nowait(m)
    got = []
    async for ev in gen.events():
        got.append((ev.choice.index, ev.delta, ev.finished))
        for m in late or []:
            gen.queue.put_nowait(m)
        late = None
    return got


def test_queued_outputs_merge_per_choice() -> None:
    """Outputs of two choices queued before the stream starts leave as one event per choice with
    their texts joined in order ("abc", then "xy" finished); an output that arrives later is an
    event of its own."""
    msgs = [(0, out(0, "a")), (1, out(1, "x")), (0, out(0, "b")), (1, out(1, "y", "length")),
            (0, out(0, "c"))]  # fmt: skip
    got = asyncio.run(_events(msgs, n=2, late=[(0, out(0, "d", "length"))]))
    assert got == [(0, "abc", False), (1, "xy", True), (0, "d", True)]


def test_one_output_at_a_time_is_one_event_each() -> None:
    """Outputs that arrive one at a time while the stream waits each become their own event, in
    order."""

    async def run() -> list:
        gen = Generation(FakeBridge())
        gen.add(0, "p", {}, [], False)
        gen.queue.put_nowait((0, out(0, "a")))
        await gen.start()
        got = []

        async def feed() -> None:
            for i, t in enumerate("bcd"):
                await asyncio.sleep(0.01)
                gen.queue.put_nowait((0, out(0, t, "length" if i == 2 else None)))

        task = asyncio.create_task(feed())
        async for ev in gen.events():
            got.append(ev.delta)
        await task
        return got

    assert asyncio.run(run()) == ["a", "b", "c", "d"]


def test_error_after_outputs_delivers_them_first() -> None:
    """When an ErrorOut (500) follows two queued outputs, the stream first yields their text (one
    event, "ab") and then raises an ApiError with status 500."""

    async def run() -> tuple[list, ApiError | None]:
        gen = Generation(FakeBridge())
        gen.add(0, "p", {}, [], False)
        gen.queue.put_nowait((0, out(0, "a")))
        await gen.start()
        gen.queue.put_nowait((0, out(0, "b")))
        gen.queue.put_nowait((0, ErrorOut(0, "boom", 500)))
        got = []
        try:
            async for ev in gen.events():
                got.append(ev.delta)
        except ApiError as e:
            return got, e
        return got, None

    got, err = asyncio.run(run())
    assert got == ["ab"] and err is not None and err.status == 500
