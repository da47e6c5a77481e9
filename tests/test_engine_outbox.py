"""The llama.cpp engine's Outbox: a step's events reach their event loops in order, one wake-up per loop, and a
loop that has closed (its server stopped) takes nothing without failing the engine thread."""

from __future__ import annotations

import asyncio
import threading

from mgr.daemon.runners.llama.engine import Event, Outbox


def test_events_reach_each_loop_in_order_with_one_wake_up_per_flush() -> None:
    loop = asyncio.new_event_loop()
    woken: list[int] = []
    original = loop.call_soon_threadsafe

    def counting(callback: object, *args: object) -> object:
        woken.append(len(args[0]) if args else 0)
        return original(callback, *args)

    loop.call_soon_threadsafe = counting  # type: ignore[assignment]
    first: asyncio.Queue[Event] = asyncio.Queue()
    second: asyncio.Queue[Event] = asyncio.Queue()
    outbox = Outbox()

    def engine_step() -> None:  # the engine thread: three events of two requests, then one flush
        outbox.put(loop, first, Event("text", text="a"))
        outbox.put(loop, second, Event("text", text="x"))
        outbox.put(loop, first, Event("done", finish_reason="stop"))
        outbox.flush()
        outbox.flush()  # nothing held: no wake-up

    async def receive() -> tuple[list[str], list[str]]:
        thread = threading.Thread(target=engine_step)
        thread.start()
        got_first = [(await first.get()).kind for _ in range(2)]
        got_second = [(await second.get()).text]
        thread.join()
        return got_first, got_second

    try:
        assert loop.run_until_complete(receive()) == (["text", "done"], ["x"])
    finally:
        loop.close()
    assert woken == [3]


def test_a_closed_loop_takes_nothing_and_the_others_still_get_theirs() -> None:
    closed, running = asyncio.new_event_loop(), asyncio.new_event_loop()
    closed.close()
    lost: asyncio.Queue[Event] = asyncio.Queue()
    kept: asyncio.Queue[Event] = asyncio.Queue()
    outbox = Outbox()
    outbox.put(closed, lost, Event("text", text="gone"))
    outbox.put(running, kept, Event("text", text="here"))
    outbox.flush()  # raises nothing

    async def receive() -> str:
        return (await asyncio.wait_for(kept.get(), 5)).text

    try:
        assert running.run_until_complete(receive()) == "here"
    finally:
        running.close()
    assert lost.empty()
