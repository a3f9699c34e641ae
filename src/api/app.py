"""The FastAPI application, built from settings by `create_app`."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp

from api.auth import Authenticator
from api.errors import install_error_handlers
from api.fastlane import ReadLane, ReserveLane
from api.logs import configure_logging
from api.middleware import RequestContextMiddleware
from api.openapi import truthful
from api.ratelimit import RateLimiter
from api.routers import (
    audit,
    availability,
    conflicts,
    deadletters,
    feeds,
    health,
    reservations,
    skus,
    stream,
    suppliers,
)
from api.runtime import SERVE_PID, Runtime, open_runtime, tune_collector
from api.settings import Settings
from api.stream import AvailabilityFeed
from projections.runner import end_with_parent


class Service(FastAPI):
    """FastAPI with the service's own middleware outermost, outside FastAPI's and
    Starlette's: a request the fast lanes answer passes through nothing else, and every
    answer (a 500 from the server-error middleware too) carries its request id and is
    logged with its status. The lanes answer their own failures with the app's handlers."""

    def build_middleware_stack(self) -> ASGIApp:
        own, self.user_middleware = self.user_middleware, []
        try:
            app = super().build_middleware_stack()
        finally:
            self.user_middleware = own
        for cls, args, kwargs in reversed(own):
            app = cls(app, *args, **kwargs)
        return app

    def openapi(self) -> dict[str, Any]:
        """FastAPI's document, its errors and raw bodies as the API answers (api.openapi)."""
        if self.openapi_schema is None:
            self.openapi_schema = truthful(super().openapi())
        return self.openapi_schema


def create_app(
    settings: Settings, runtime: Runtime | None = None, *, fast_lane: bool = True
) -> Service:
    """The service; it opens its own runtime on startup unless one is given. Without
    `fast_lane`, FastAPI's routes answer every order and availability read (see
    api.fastlane)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        opened = runtime
        if opened is None:
            opened = await run_in_threadpool(
                open_runtime,
                settings,
                migrate_first=settings.migrate_on_start,
                sweep=settings.run_sweeper,
                read_cache=True,
                observe=True,
            )
        app.state.runtime = opened
        app.state.availability_feed = AvailabilityFeed(
            opened.store, settings.stream_refresh_seconds
        )
        if runtime is None:
            opened.leases.present("api")
            tune_collector()
        try:
            yield
        finally:
            await run_in_threadpool(app.state.availability_feed.stop)
            if runtime is None:
                await run_in_threadpool(opened.close)

    app = Service(
        title="Stockledger",
        version=version("stockledger"),
        description="Event-sourced inventory ledger: supplier stock and OMS reservations.",
        lifespan=lifespan,
        # `/v1/reservations/` is no route: 404 in the envelope. It was a bare 307 to the
        # same path without its slash, as an absolute `http://` URL, behind a TLS proxy
        # too (an OMS engineer's walkthrough).
        redirect_slashes=False,
        # The service exports no OpenTelemetry; left on, FastAPI asks the global providers
        # (and the environment) whether it should, on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.authenticator = Authenticator(settings.api_keys)
    # Added first, so they run inside the request context (ids, logging, body limits).
    if fast_lane:
        app.add_middleware(ReserveLane, service=app)
        app.add_middleware(ReadLane, service=app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        max_feed_bytes=settings.max_feed_bytes,
        max_webhook_bytes=settings.max_webhook_bytes,
        max_upload_bytes_in_flight=settings.max_upload_bytes_in_flight or None,
        max_webhook_bytes_in_flight=settings.max_webhook_bytes_in_flight or None,
        webhook_body_seconds=settings.webhook_body_seconds,
        authenticator=app.state.authenticator,
        limiter=(
            RateLimiter(settings.rate_limit_per_second, settings.rate_limit_burst)
            if settings.rate_limit_per_second
            else None
        ),
        limited_roles=frozenset(settings.rate_limit_roles),
    )
    install_error_handlers(app)
    # Routes are matched in order: the hottest paths come first.
    routers = (
        availability,
        reservations,
        health,
        suppliers,
        skus,
        conflicts,
        audit,
        feeds,
        deadletters,
        stream,
    )
    for module in routers:
        app.include_router(module.router)
    return app


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: settings from LEDGER_* variables. A worker process of
    `serve --workers N` ends (SIGTERM, as `serve` would stop it) when `serve` does."""
    serve = os.environ.get(SERVE_PID)
    if serve is not None and serve.isdigit() and int(serve) != os.getpid():
        end_with_parent(int(serve), signal.SIGTERM)
    settings = Settings()
    configure_logging(settings)
    return create_app(settings)
