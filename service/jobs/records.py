"""Job records and the two stores that keep them.

:class:`RedisJobStore` (one hash per job, so records outlive an API restart) and
:class:`LocalJobStore` (memory, optionally mirrored to JSON files) share one contract:
state changes are compare-and-set, and a running job is held by a lease (a token with a
TTL renewed every batch). A redelivered task that finds the job finished, cancelled or
leased by a live worker does not run it again: that, with atomic result files, gives
exactly-once results on an at-least-once queue.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, cast

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
Claim = Literal["run", "done", "busy", "missing", "cancelled"]


@dataclass
class JobRecord:
    """Everything known about one job (an evaluation or a video); ``plan`` is the resolved, server-side request."""

    id: str
    state: str = "queued"
    progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    request: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: str | None = None
    predictions: str | None = None
    worker: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    parent: str | None = None  # a shard's (or a merge's) job: such records are not listed
    shards: int = 0  # a sharded job: how many shards (their records: shard_id(id, i))
    shard_status: dict[str, int] | None = None  # filled on read by JobService.get (shard counts); not stored
    frames_done: int | None = None  # a video job: filled on read by JobService.get; not stored
    kind: str = "evaluation"  # or "video" (service/jobs/video.py): what ``plan`` and ``result`` hold

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    def to_fields(self) -> dict[str, str]:
        return {k: json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: json.loads(v) for k, v in raw.items() if k in known})


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary sibling, fsync, then rename: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself survives a crash of the machine too
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class LocalJobStore:
    """Embedded mode: records in memory, mirrored to ``root/<id>/record.json`` when a root is given."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._records: dict[str, JobRecord] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        if root is not None:
            self._load(root)

    def _load(self, root: Path) -> None:
        """Jobs of a previous process that never finished cannot resume in this one: mark them failed."""
        for path in sorted(root.glob("*/record.json")):
            try:
                rec = JobRecord(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                continue
            if rec.state not in TERMINAL:
                rec.state, rec.finished_at = "failed", time.time()
                rec.error = "interrupted: the embedded executor stopped (service restart) before the job finished"
                self._save(rec)
            self._records[rec.id] = rec

    def _save(self, rec: JobRecord) -> None:
        if self.root is not None:
            atomic_write_text(self.root / rec.id / "record.json", json.dumps(asdict(rec)))

    def ping(self) -> None:
        """Always reachable."""

    def create(self, rec: JobRecord) -> None:
        with self._lock:
            if rec.id in self._records:
                raise ValueError(f"job {rec.id} exists")
            self._records[rec.id] = JobRecord(**asdict(rec))
            self._save(rec)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            rec = self._records.get(job_id)
            return JobRecord(**asdict(rec)) if rec is not None else None

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        return [self.get(job_id) for job_id in job_ids]

    def recent(self, limit: int) -> list[JobRecord]:
        with self._lock:
            listed = [r for r in self._records.values() if r.parent is None]
            recs = sorted(listed, key=lambda r: r.created_at, reverse=True)[:limit]
            return [JobRecord(**asdict(r)) for r in recs]

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(STATES, 0)
            for rec in self._records.values():
                if rec.parent is None:
                    out[rec.state] += 1
            return out

    def _leased_by(self, job_id: str) -> str | None:
        lease = self._leases.get(job_id)
        if lease is None or lease[1] < time.monotonic():
            return None
        return lease[0]

    def claim(self, job_id: str, token: str, ttl_s: float, worker: str) -> Claim:
        with self._lock:
            rec = self._records.get(job_id)
            if rec is None:
                return "missing"
            if rec.state in TERMINAL:
                return "done"
            if rec.cancel_requested:
                rec.state, rec.finished_at = "cancelled", time.time()
                self._save(rec)
                return "cancelled"
            if self._leased_by(job_id) is not None:
                return "busy"
            self._leases[job_id] = (token, time.monotonic() + ttl_s)
            rec.state, rec.started_at, rec.worker, rec.progress = "running", time.time(), worker, 0.0
            rec.attempts += 1
            self._save(rec)
            return "run"

    def heartbeat(self, job_id: str, token: str, ttl_s: float, progress: float) -> tuple[bool, bool]:
        """Renew the lease (or retake it if it lapsed and nobody claimed the job) and store progress.

        Returns (still ours, cancel requested).
        """
        with self._lock:
            rec = self._records.get(job_id)
            if rec is None or rec.state != "running" or self._leased_by(job_id) not in (token, None):
                return False, bool(rec and rec.cancel_requested)
            self._leases[job_id] = (token, time.monotonic() + ttl_s)  # renew, or retake a lapsed lease
            rec.progress = progress
            self._save(rec)
            return True, rec.cancel_requested

    def transition(
        self, job_id: str, from_states: Iterable[str], to_state: str, token: str | None = None, **updates: Any
    ) -> bool:
        """Compare-and-set: move to ``to_state`` only from ``from_states``; with ``token``, only if no one
        else holds the lease."""
        with self._lock:
            rec = self._records.get(job_id)
            if rec is None or rec.state not in set(from_states):
                return False
            if token is not None and self._leased_by(job_id) not in (token, None):
                return False
            for key, value in updates.items():
                setattr(rec, key, value)
            rec.state = to_state
            if to_state in TERMINAL:
                self._leases.pop(job_id, None)
            self._save(rec)
            return True

    def request_cancel(self, job_id: str) -> str | None:
        """Queued -> cancelled now; running -> flagged (the worker stops at the next batch). Returns the state."""
        with self._lock:
            rec = self._records.get(job_id)
            if rec is None:
                return None
            if rec.state == "queued":
                rec.state, rec.finished_at = "cancelled", time.time()
            elif rec.state == "running":
                rec.cancel_requested = True
            self._save(rec)
            return rec.state

    def close(self) -> None:
        """Nothing to release."""


_CLAIM = """
local raw = redis.call('HGET', KEYS[1], 'state')
if not raw then return 'missing' end
local st = cjson.decode(raw)
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then return 'done' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' then
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'finished_at', ARGV[3])
  redis.call('SMOVE', KEYS[3] .. st, KEYS[3] .. 'cancelled', ARGV[5])
  return 'cancelled'
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'busy' end
local attempts = cjson.decode(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
redis.call('HSET', KEYS[1], 'state', '"running"', 'started_at', ARGV[3], 'worker', ARGV[4],
           'progress', '0.0', 'attempts', tostring(attempts))
redis.call('SMOVE', KEYS[3] .. st, KEYS[3] .. 'running', ARGV[5])
return 'run'
"""

_HEARTBEAT = """
local cancel = redis.call('HGET', KEYS[1], 'cancel_requested') == 'true' and 1 or 0
if redis.call('HGET', KEYS[1], 'state') ~= '"running"' then return {0, cancel} end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
elseif not holder then
  -- our lease ran out (a stalled process) but nobody took the job over: take it back
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
else
  return {0, cancel}
end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
return {1, cancel}
"""

# KEYS: job hash, lease key, state-set prefix. ARGV: token ('' = none), job id, to_state json, allowed
# states (json list), then field/value pairs.
_TRANSITION = """
local raw = redis.call('HGET', KEYS[1], 'state')
if not raw then return 0 end
local st = cjson.decode(raw)
local allowed = false
for _, s in ipairs(cjson.decode(ARGV[4])) do if s == st then allowed = true end end
if not allowed then return 0 end
if ARGV[1] ~= '' then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[1] then return 0 end  -- a lapsed lease nobody took is still ours
end
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local to = cjson.decode(ARGV[3])
redis.call('HSET', KEYS[1], 'state', ARGV[3])
redis.call('SMOVE', KEYS[3] .. st, KEYS[3] .. to, ARGV[2])
if to == 'succeeded' or to == 'failed' or to == 'cancelled' then redis.call('DEL', KEYS[2]) end
return 1
"""

_CANCEL = """
local raw = redis.call('HGET', KEYS[1], 'state')
if not raw then return nil end
local st = cjson.decode(raw)
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'finished_at', ARGV[1])
  redis.call('SMOVE', KEYS[2] .. 'queued', KEYS[2] .. 'cancelled', ARGV[2])
  return 'cancelled'
elseif st == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
end
return st
"""


class RedisJobStore:
    """Records as Redis hashes (JSON-encoded fields) with Lua compare-and-set transitions."""

    def __init__(self, url: str, prefix: str = "ditepose", timeout_s: float = 2.0) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        self._claim = self.client.register_script(_CLAIM)
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._transition = self.client.register_script(_TRANSITION)
        self._cancel = self.client.register_script(_CANCEL)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _lease(self, job_id: str) -> str:
        return f"{self.prefix}:lease:{job_id}"

    @property
    def _states(self) -> str:
        return f"{self.prefix}:state:"

    def ping(self) -> None:
        """Raise ``redis.exceptions.ConnectionError`` (or TimeoutError) when Redis is unreachable."""
        self.client.ping()

    def create(self, rec: JobRecord) -> None:
        """A shard's record (``parent`` set) stays out of the job list and the state counts (the scripts'
        SMOVE of a member not in its set does nothing)."""
        key = self._key(rec.id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, "id", json.dumps(rec.id))
            mapping: dict[Any, Any] = rec.to_fields()  # redis' stubs want its own key/value union
            pipe.hset(key, mapping=mapping)
            if rec.parent is None:
                pipe.zadd(f"{self.prefix}:jobs", {rec.id: rec.created_at})
                pipe.sadd(self._states + rec.state, rec.id)
            created, *_ = pipe.execute()
        if not created:
            raise ValueError(f"job {rec.id} exists")

    def get(self, job_id: str) -> JobRecord | None:
        raw = _text_fields(self.client.hgetall(self._key(job_id)))
        return JobRecord.from_fields(raw) if raw else None

    def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self._key(job_id))
            rows = pipe.execute()
        return [JobRecord.from_fields(_text_fields(raw)) if raw else None for raw in rows]

    def recent(self, limit: int) -> list[JobRecord]:
        ids = self.client.zrevrange(f"{self.prefix}:jobs", 0, limit - 1)
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._key(str(job_id)))
            rows = pipe.execute()
        return [JobRecord.from_fields(_text_fields(raw)) for raw in rows if raw]

    def counts(self) -> dict[str, int]:
        with self.client.pipeline(transaction=False) as pipe:
            for state in STATES:
                pipe.scard(self._states + state)
            return dict(zip(STATES, (int(n) for n in pipe.execute()), strict=True))

    def claim(self, job_id: str, token: str, ttl_s: float, worker: str) -> Claim:
        keys = [self._key(job_id), self._lease(job_id), self._states]
        args: list[str | int] = [token, int(ttl_s * 1000), json.dumps(time.time()), json.dumps(worker), job_id]
        return self._claim(keys=keys, args=args)

    def heartbeat(self, job_id: str, token: str, ttl_s: float, progress: float) -> tuple[bool, bool]:
        keys = [self._key(job_id), self._lease(job_id)]
        owned, cancel = self._heartbeat(keys=keys, args=[token, int(ttl_s * 1000), json.dumps(float(progress))])
        return bool(owned), bool(cancel)

    def transition(
        self, job_id: str, from_states: Iterable[str], to_state: str, token: str | None = None, **updates: Any
    ) -> bool:
        keys = [self._key(job_id), self._lease(job_id), self._states]
        args: list[Any] = [token or "", job_id, json.dumps(to_state), json.dumps(list(from_states))]
        for key, value in updates.items():
            args += [key, json.dumps(value)]
        return bool(self._transition(keys=keys, args=args))

    def request_cancel(self, job_id: str) -> str | None:
        return self._cancel(keys=[self._key(job_id), self._states], args=[json.dumps(time.time()), job_id])

    def close(self) -> None:
        self.client.close()


JobStore = LocalJobStore | RedisJobStore


def make_store(redis_url: str | None, root: Path | None, timeout_s: float = 2.0) -> JobStore:
    """Redis when a URL is configured, else the embedded store mirrored under ``root``."""
    if redis_url:
        return RedisJobStore(redis_url, timeout_s=timeout_s)
    return LocalJobStore(root)


def _text_fields(raw: Any) -> dict[str, str]:
    """A record hash as the client returns it: text, since it decodes responses (redis' stubs say bytes | str)."""
    return cast(dict[str, str], raw)
