"""Offline jobs: ``POST /v1/evaluate``, ``GET/DELETE /v1/jobs/{id}``, ``GET /v1/jobs``, a video job's
``GET /v1/jobs/{id}/result`` (``POST /v1/videos`` is :mod:`.videos`).

The :class:`~ditepose.service.jobs.manager.JobService` comes as a dependency (built on first
use from the app's settings); with Redis down these routes answer 503 while ``/v1/pose`` is
untouched.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse

from ditepose.service.core.errors import ServiceError
from ditepose.service.http.deps import AppContext, JobServiceDep
from ditepose.service.http.routes import error_responses
from ditepose.service.http.untrusted_body import UntrustedJsonRoute
from ditepose.service.jobs.catalogue import BadName, UnknownName
from ditepose.service.jobs.executor import BrokerUnavailable
from ditepose.service.jobs.manager import InvalidRequest, JobService, UnknownModel
from ditepose.service.jobs.schemas import EvaluateRequest, JobAccepted, JobList, JobResponse, job_response
from ditepose.service.jobs.video import MEDIA_TYPES

# The JSON body of /v1/evaluate goes through the service's untrusted-JSON reader before FastAPI validates it.
router = APIRouter(prefix="/v1", tags=["jobs"], route_class=UntrustedJsonRoute)


def jobs_readiness(context: AppContext) -> dict[str, Any]:
    """The jobs part of /readyz: mode and whether Redis answers (never raises)."""
    try:
        service = context.jobs()
    except Exception as exc:
        return {"ready": False, "error": f"{type(exc).__name__}: {exc}"}
    return service.health()


def _unavailable(exc: BrokerUnavailable) -> ServiceError:
    return ServiceError("unavailable", f"evaluation jobs are unavailable: {exc}")


async def _call(fn: Any, *args: Any) -> Any:
    """Store and broker calls block (Redis round trips): keep them off the event loop."""
    try:
        return await asyncio.to_thread(fn, *args)
    except BrokerUnavailable as exc:
        raise _unavailable(exc) from exc


@router.post("/evaluate", status_code=202, response_model=JobAccepted, summary="Start an offline evaluation job",
             responses=error_responses("unknown_dataset", "unknown_model", "too_large", "invalid_request",
                                       "unavailable"))
async def evaluate(jobs: JobServiceDep, req: EvaluateRequest) -> JSONResponse:
    """Evaluate a served model (or a checkpoint of the server's checkpoint folder) on a named dataset.
    Answers 202 at once; poll the job at `Location`."""
    try:
        rec = await _call(jobs.submit, req)
    except UnknownModel as exc:
        raise ServiceError("unknown_model", str(exc)) from exc
    except UnknownName as exc:
        raise ServiceError("unknown_dataset", str(exc)) from exc
    except (BadName, InvalidRequest) as exc:
        raise ServiceError("invalid_request", str(exc)) from exc
    location = f"/v1/jobs/{rec.id}"
    body = JobAccepted(id=rec.id, state="queued", location=location).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": location})


async def _record(jobs: JobService, job_id: str) -> Any:
    rec = await _call(jobs.get, job_id)
    if rec is None:
        raise ServiceError("unknown_job", f"no job {job_id!r}")
    return rec


@router.get("/jobs", response_model=JobList, summary="Recent evaluation jobs, newest first",
            responses=error_responses("invalid_request", "unavailable"))
async def list_jobs(
    jobs: JobServiceDep,
    limit: int | None = Query(None, ge=1, le=1000, description="Default: DITEPOSE_RECENT_JOBS."),
) -> JobList:
    recs = await _call(jobs.recent, limit)
    now = time.time()
    return JobList(jobs=[job_response(r, now) for r in recs])


@router.get("/jobs/{job_id}", response_model=JobResponse, summary="State, progress, timings and metrics of a job",
            responses=error_responses("unknown_job", "invalid_request", "unavailable"))
async def get_job(jobs: JobServiceDep, job_id: str) -> JobResponse:
    return job_response(await _record(jobs, job_id), time.time())


@router.delete("/jobs/{job_id}", response_model=JobResponse, summary="Cancel a queued or running job",
               responses=error_responses("unknown_job", "job_finished", "invalid_request", "unavailable"))
async def cancel_job(jobs: JobServiceDep, job_id: str) -> JobResponse:
    """A queued job is cancelled at once; a running one stops after its current batch
    (`cancel_requested` is true until then)."""
    rec = await _record(jobs, job_id)
    if rec.state in ("succeeded", "failed"):
        raise ServiceError("job_finished", f"job {job_id} already {rec.state}")
    rec = await _call(jobs.cancel, job_id)
    return job_response(rec, time.time())


@router.get("/jobs/{job_id}/predictions", summary="Per-image predictions JSON of a succeeded job",
            response_class=FileResponse,
            responses=error_responses("unknown_job", "not_ready", "invalid_request", "unavailable"))
async def job_predictions(jobs: JobServiceDep, job_id: str) -> FileResponse:
    rec = await _record(jobs, job_id)
    if rec.kind == "video":
        raise ServiceError("unknown_job", f"job {job_id} is a video job; see /v1/jobs/{job_id}/result")
    path = jobs.predictions_file(rec)
    if path is None:
        raise ServiceError("not_ready", f"job {job_id} is {rec.state}; predictions exist once it succeeded")
    return FileResponse(path, media_type="application/json", filename=f"predictions-{job_id}.json")


@router.get("/jobs/{job_id}/result", summary="Tracks of a succeeded video job (json, csv, coco) or its video (mp4)",
            response_class=FileResponse,
            responses=error_responses("unknown_job", "not_ready", "not_rendered", "result_expired",
                                      "invalid_request", "unavailable"))
async def job_result(
    jobs: JobServiceDep, job_id: str,
    format: Literal["json", "csv", "coco", "mp4"] = Query("json", description="json: tracks per person; csv: one "
                                                          "row per (track, frame, joint); coco: COCO keypoint "
                                                          "results per frame; mp4: the annotated video (render)."),
) -> FileResponse:
    rec = await _record(jobs, job_id)
    if rec.kind != "video":
        raise ServiceError("unknown_job", f"job {job_id} is an evaluation job; see /v1/jobs/{job_id}/predictions")
    if rec.state != "succeeded":
        raise ServiceError("not_ready", f"job {job_id} is {rec.state}; its result exists once it succeeded")
    path = jobs.video_result_file(rec, format)
    if path is None:
        if format == "mp4" and not rec.request.get("render"):
            raise ServiceError("not_rendered", f"job {job_id} was submitted without render=true")
        raise ServiceError("result_expired", f"the result files of job {job_id} were deleted "
                           "(DITEPOSE_VIDEO_RESULT_TTL_S after the job ended)")
    suffix = {"json": "json", "csv": "csv", "coco": "coco.json", "mp4": "mp4"}[format]
    return FileResponse(path, media_type=MEDIA_TYPES[format], filename=f"tracks-{job_id}.{suffix}")
