"""Background tasks: one that fails is logged at once, with its traceback, as one entry of the daemon's log."""

import asyncio

from structlog.testing import capture_logs

from maintd.tasks import Tasks


def test_a_failing_background_task_is_logged_once_with_its_traceback():
    async def joins_a_switch():
        raise ValueError("'maybe' is not a valid Decision")

    async def main():
        tasks = Tasks()
        task = tasks.spawn(joins_a_switch())
        await asyncio.wait([task])
        await asyncio.sleep(0)  # done callbacks run on the loop's next turn

    with capture_logs() as events:
        asyncio.run(main())
    [entry] = events
    assert entry["log_level"] == "error" and "joins_a_switch failed: ValueError(" in entry["event"]
    assert isinstance(entry["exc_info"], ValueError)
