"""``create_app(settings) -> FastAPI``: routers, error shape, metrics, and the worker pool.

The app either owns its pool (loaded at startup, stopped at shutdown) or is handed one
that gRPC shares; then the caller starts and stops it. Routes reach the pool and services
through the typed dependencies of :mod:`ditepose.service.http.deps`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from ditepose import __version__
from ditepose.service.batching.pool import WorkerPool
from ditepose.service.core.admission import Admission
from ditepose.service.core.errors import ERROR_CODES, install_error_handlers
from ditepose.service.core.settings import Settings
from ditepose.service.http.deps import AppContext
from ditepose.service.http.disconnects import install_disconnect_handler
from ditepose.service.http.middleware import AdmissionControl, BodySizeLimit, RequestMetrics
from ditepose.service.http.routes import demo, error_responses, health, jobs, models, pose
from ditepose.service.http.security import require_api_key

log = logging.getLogger(__name__)

_DESCRIPTION = """Top-down 2D human pose estimation with Dite-HRNet (Li et al., IJCAI 2022).

Send an image (and optionally person boxes) to `POST /v1/pose`; get 17 COCO keypoints per person
in image pixels. Requests from many clients are batched together on the workers.

Errors always look like `{"error": {"code": "...", "message": "..."}}`. Codes:

""" + "\n".join(f"* `{code}` ({status}): {text}" for code, (status, text) in ERROR_CODES.items())


def create_app(
    settings: Settings | None = None, pool: WorkerPool | None = None, admission: Admission | None = None
) -> FastAPI:
    """Build the REST app; without ``pool`` it loads the configured models at startup. ``admission``:
    an in-flight count shared beyond this app (the front-ends of ``--api-processes``)."""
    settings = settings or Settings()
    context = AppContext(settings, admission=admission)
    owns_pool = pool is None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns_pool:
            context.attach(await asyncio.to_thread(lambda: WorkerPool.from_settings(settings).start()))
        try:
            yield
        finally:
            context.close()
            if owns_pool and context.pool is not None:
                await asyncio.to_thread(context.pool.stop)

    app = FastAPI(title="DitePose", version=__version__, description=_DESCRIPTION, lifespan=lifespan)
    app.state.context = context
    if pool is not None:
        context.attach(pool)

    install_error_handlers(app, settings.retry_after_s)
    install_disconnect_handler(app, context.metrics.registry)
    secured = {"dependencies": [Depends(require_api_key)], "responses": error_responses("unauthorized")}
    app.include_router(pose.router, **secured)
    app.include_router(models.router, **secured)
    app.include_router(jobs.router, **secured)
    app.include_router(health.router)
    app.include_router(demo.router)  # GET /: the browser demo (public page, not in OpenAPI)

    # Base64 JSON is 4/3 of the image, plus the other fields.
    # Outermost first: RequestMetrics -> AdmissionControl -> BodySizeLimit -> routes.
    assert context.admission is not None
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes * 4 // 3 + 64 * 1024)
    app.add_middleware(AdmissionControl, admission=context.admission, routes=frozenset({("POST", "/v1/pose")}))
    app.add_middleware(RequestMetrics, metrics=context.metrics)
    return app
