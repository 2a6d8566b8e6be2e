"""Thin HTTP routers; the work happens in :mod:`service.pose_service`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.pose_service import PoseService


def service_of(request: Request) -> PoseService:
    """The app's :class:`PoseService`; ``unavailable`` while models are still loading."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise ServiceError("unavailable", "the service is starting; models are not loaded yet")
    return service
