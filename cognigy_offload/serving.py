"""Run an ASGI app under uvicorn inside the current event loop (tests, demo, bench)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import uvicorn


@contextlib.asynccontextmanager
async def run_uvicorn(
    app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> AsyncIterator[str]:
    """Serve ``app`` on loopback, yield its base URL, then shut it down (lifespan included)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        **options,
    )
    server = uvicorn.Server(config)
    # The host process (pytest, the demo) keeps its own signal handling.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(60):
            while not server.started:
                if server.should_exit or (tg.cancel_scope.cancel_called):
                    raise RuntimeError("the server did not start")
                await anyio.sleep(0.005)
        bound = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield f"http://{host}:{bound}"
        finally:
            server.should_exit = True
