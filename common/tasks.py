"""Task helpers both services use for their background loops."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancels a background task and waits until it has really ended (its `finally` blocks ran)."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
