"""Fixtures and helpers of the job tests: a real redis-server, a tiny COCO set, worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.conftest import REPO_ROOT, python_cmd, stop_process_group, subprocess_env
from tests.support import free_port, wait_until

T = TypeVar("T")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


wait_for = wait_until  # the name the job tests call it by


class RedisServer:
    """A throw-away ``redis-server`` on a free loopback port (no RDB/AOF unless ``persist``)."""

    def __init__(self, workdir: Path, persist: bool = False) -> None:
        if not Path(REDIS_SERVER).is_file():
            pytest.skip("redis-server is not installed")
        self.workdir, self.persist = workdir, persist
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else \
            ["--save", "", "--appendonly", "no"]
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               *persistence]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        wait_for(lambda: _pings(client), timeout=10, what="redis-server to answer")
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@dataclass(frozen=True)
class TinyEval:
    """A few coco-mini val images as a dataset, plus a small-input checkpoint in a checkpoint folder."""

    root: Path
    ann_file: Path
    full_ann_file: Path
    img_dir: Path
    checkpoint_dir: Path
    checkpoint: str
    input_size: tuple[int, int]

    def datasets(self) -> dict[str, dict[str, str]]:
        return {
            "tiny": {"format": "coco", "ann_file": str(self.ann_file), "img_dir": str(self.img_dir)},
            "coco-mini-val": {"format": "coco", "ann_file": str(self.full_ann_file), "img_dir": str(self.img_dir)},
        }

    def env(self, jobs_dir: Path, redis_url: str | None = None, **extra: str) -> dict[str, str]:
        env = {
            "DITEPOSE_DATASETS": json.dumps(self.datasets()),
            "DITEPOSE_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "DITEPOSE_JOBS_DIR": str(jobs_dir),
            "DITEPOSE_TORCH_THREADS": "1",
            **extra,
        }
        if redis_url:
            env["DITEPOSE_REDIS_URL"] = redis_url
        return env


@pytest.fixture(scope="session")
def tiny_eval(tmp_path_factory: pytest.TempPathFactory, coco_mini: Path) -> TinyEval:
    import torch

    from ditepose import model as models

    root = tmp_path_factory.mktemp("tiny_eval")
    full = coco_mini / "annotations" / "person_keypoints_val2017.json"
    ann = json.loads(full.read_text())
    with_people = sorted({a["image_id"] for a in ann["annotations"] if a.get("num_keypoints", 0) > 0})[:3]
    subset = dict(ann, images=[i for i in ann["images"] if i["id"] in with_people],
                  annotations=[a for a in ann["annotations"] if a["image_id"] in with_people])
    ann_file = root / "tiny_val.json"
    ann_file.write_text(json.dumps(subset))
    ckpt_dir = root / "checkpoints"
    ckpt_dir.mkdir()
    torch.manual_seed(0)
    net = models.build_model("dite_hrnet_18", num_joints=17)
    size = (64, 96)
    models.save_checkpoint(ckpt_dir / "tiny.pth", net, models.CheckpointMeta("dite_hrnet_18", "coco", 17, input_size=size))
    return TinyEval(root, ann_file, full, coco_mini / "val2017", ckpt_dir, "tiny.pth", size)


class WorkerProcess:
    """``python -m ditepose worker`` in its own process group (so SIGKILL takes its pool children too)."""

    def __init__(self, env: dict[str, str], log_file: Path, *args: str) -> None:
        self.log_file = log_file
        self._log = open(log_file, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            python_cmd("worker", "--concurrency", "1", "--loglevel", "INFO", *args),
            cwd=REPO_ROOT, env=subprocess_env(**env), stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children): a crashed machine."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.close()

    def stop(self) -> None:
        stop_process_group(self.proc)
        self._log.close()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")


def direct_evaluation(tiny: TinyEval, ann_file: Path, max_people: int | None = None, img_dir: Path | None = None,
                      flip_test: bool = True) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """What ``ditepose evaluate`` computes for the tiny checkpoint: the plain module in the evaluation loop."""
    from ditepose import model as models
    from ditepose.model.pipeline import module_infer
    from ditepose.training.datasets import CocoKeypointDataset
    from ditepose.training.evaluate import pipeline_for, predict, score

    module, meta = models.load_pose_model(tiny.checkpoint_dir / tiny.checkpoint)
    dataset = CocoKeypointDataset(ann_file, img_dir or tiny.img_dir, tuple(meta.input_size), train=False,
                                  max_people=max_people)
    preds = predict(module_infer(module), dataset, pipeline_for(dataset, flip_test), batch_size=8)
    return score(dataset, preds), preds


def tiny_plan(tiny: TinyEval, checkpoint: Path | None = None, dataset: dict[str, str] | None = None,
              name: str = "tiny", **options: Any) -> dict[str, Any]:
    """A stored job plan: the tiny checkpoint (or ``checkpoint``) on the tiny set (or ``dataset``)."""
    from ditepose.service.core.settings import DatasetSpec, ModelSpec
    from ditepose.service.jobs.plan import EvalOptions, JobPlan

    spec = DatasetSpec.model_validate(dataset or tiny.datasets()["tiny"])
    model = ModelSpec(name=name, checkpoint=checkpoint or tiny.checkpoint_dir / tiny.checkpoint, dataset=spec.format)
    return JobPlan(model, False, name, spec, EvalOptions(**options)).to_dict()


@pytest.fixture(scope="module")
def job_pool() -> Iterator[Any]:
    """A started worker pool without models on the CPU: jobs add theirs (as a Celery worker's pool does)."""
    from ditepose.service.batching.pool import WorkerPool

    pool = WorkerPool([], ["cpu"], workers_per_device=1, max_delay_ms=1.0, timeout_s=600.0, torch_threads=1).start()
    yield pool
    pool.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Inference in this process on one thread: on a busy 2-core machine two OpenMP threads spin for seconds."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SYNTH_IMAGES = 400  # the "demo-synthetic with at least 400 images"


@dataclass(frozen=True)
class SynthEval:
    """'demo-synthetic' at 400 images (the built-in generator and seed; the catalogue's default has 8),
    passed to the service through the ``datasets`` setting under the built-in name."""

    root: Path
    ann_file: Path
    img_dir: Path

    def datasets(self, tiny: TinyEval) -> dict[str, dict[str, str]]:
        return {**tiny.datasets(), "demo-synthetic": {"format": "coco", "ann_file": str(self.ann_file),
                                                      "img_dir": str(self.img_dir)}}


@pytest.fixture(scope="session")
def synth_eval(tmp_path_factory: pytest.TempPathFactory) -> SynthEval:
    from ditepose.service.jobs.catalogue import DEMO_SEED
    from ditepose.training.synth import synthesize

    root = tmp_path_factory.mktemp("demo400")
    ann = synthesize("coco", root, SYNTH_IMAGES, seed=DEMO_SEED, split="val")
    return SynthEval(root, ann, root / "val")
