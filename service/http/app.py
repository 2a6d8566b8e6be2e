"""``create_app(settings) -> FastAPI``: routers, error shape, metrics, and the worker pool.

The app either owns its pool (built by :func:`~ditepose.service.core.serving.build_pool` at
startup, stopped at shutdown) or is handed the composition root's
:class:`~ditepose.service.core.serving.Serving`, whose pool and pose service gRPC shares; then
the caller starts and stops the pool. Routes reach the pool and services through the typed
dependencies of :mod:`ditepose.service.http.deps`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, params

from ditepose import __version__
from ditepose.service.core.errors import ERROR_CODES
from ditepose.service.core.serving import Serving, ServingPool, build_pool
from ditepose.service.core.settings import Settings
from ditepose.service.http.deps import AppContext
from ditepose.service.http.disconnects import install_disconnect_handler
from ditepose.service.http.errors import install_error_handlers
from ditepose.service.http.middleware import AdmissionControl, BodySizeLimit, RequestMetrics
from ditepose.service.http.routes import demo, error_responses, health, jobs, models, pose, videos
from ditepose.service.http.security import require_api_key

log = logging.getLogger(__name__)

_DESCRIPTION = """Top-down 2D human pose estimation with Dite-HRNet (Li et al., IJCAI 2022).

Send an image (and optionally person boxes) to `POST /v1/pose`; get 17 COCO keypoints per person
in image pixels. Requests from many clients are batched together on the workers.

Errors always look like `{"error": {"code": "...", "message": "..."}}`. Codes:

""" + "\n".join(f"* `{code}` ({status}): {text}" for code, (status, text) in ERROR_CODES.items())


def create_app(
    settings: Settings | None = None, serving: Serving | None = None, *, jobs_unavailable: str | None = None,
) -> FastAPI:
    """Build the REST app over ``serving`` (the composition root's shared objects, a pool attached;
    its settings are the app's), or, without it, over a pool of its own: loaded from ``settings``
    at startup, stopped at shutdown. ``jobs_unavailable``: why the job routes answer
    ``unavailable`` here (see :class:`AppContext`)."""
    if serving is not None and serving.service is None:
        raise ValueError("create_app: attach a pool to the Serving first (Serving.attach), or pass none")
    owns_pool = serving is None
    context = AppContext(serving or Serving.create(settings or Settings()), jobs_unavailable)
    settings = context.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned: ServingPool | None = None
        if owns_pool:
            owned = await asyncio.to_thread(lambda: build_pool(settings).start())
            context.serving.attach(owned.pool, owned.watcher)
        try:
            yield
        finally:
            context.close()
            if owned is not None:
                await asyncio.to_thread(owned.stop)

    app = FastAPI(title="DitePose", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.context = context
    install_error_handlers(app, settings.retry_after_s)
    install_disconnect_handler(app, context.metrics.registry)
    secured: list[params.Depends] = [Depends(require_api_key)]
    unauthorized = error_responses("unauthorized")
    for router in (pose.router, models.router, jobs.router, videos.router):
        app.include_router(router, dependencies=secured, responses=unauthorized)
    app.include_router(health.router)
    app.include_router(demo.router)  # GET /: the browser demo (public page, not in OpenAPI)

    # Base64 JSON is 4/3 of the image, plus the other fields.
    # Outermost first: RequestMetrics -> AdmissionControl -> BodySizeLimit -> routes.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes * 4 // 3 + 64 * 1024,
                       path_limits={"/v1/videos": settings.video_max_upload_bytes + 64 * 1024})
    app.add_middleware(AdmissionControl, admission=context.admission, routes=frozenset({("POST", "/v1/pose")}))
    app.add_middleware(RequestMetrics, metrics=context.metrics)
    return app
