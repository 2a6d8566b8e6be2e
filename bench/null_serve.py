"""``ditepose serve`` with the network replaced by zeros: the service's cost without the model.

Everything else is the production path (uvicorn, FastAPI routes and middleware, multipart
parsing, JPEG decoding, crops, the batcher and worker thread, decoding of the heatmaps,
the JSON answer); only the infer callable returns zero heatmaps of the right shape at once.
``bench/service.py --null-network`` uses it to measure the per-request overhead that the
real network's throughput has to share the CPU with.

    PYTHONPATH=. DITEPOSE_MODELS='[{"name": "m", "checkpoint": "..."}]' python -m bench.null_serve --port 8000
"""

from __future__ import annotations

import argparse

import torch

from ditepose.service.batching.loaded_model import LoadedModel


def zero_infer_factory(model: LoadedModel, device: str):
    """An infer callable with the model's output shape and no computation."""
    width, height = model.input_size

    def infer(batch: torch.Tensor) -> torch.Tensor:
        return torch.zeros(batch.shape[0], model.num_joints, height // 4, width // 4)

    return infer


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from ditepose.service.batching.pool import WorkerPool
    from ditepose.service.core.model_loader import load_models_isolated
    from ditepose.service.core.serving import Serving
    from ditepose.service.core.settings import Settings
    from ditepose.service.http.app import create_app

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    settings = Settings(port=args.port, grpc_enabled=False)
    loaded, _ = load_models_isolated(settings.models)
    pool = WorkerPool(
        loaded, ["cpu"], max_batch_size=settings.max_batch_size, max_delay_ms=settings.max_delay_ms,
        queue_size=settings.queue_size, timeout_s=settings.request_timeout_s, infer_factory=zero_infer_factory,
        workers_per_device=settings.resolved_workers_per_device(), torch_threads=settings.resolved_torch_threads(),
    ).start()
    serving = Serving.create(settings)
    serving.attach(pool)
    try:
        uvicorn.run(create_app(settings, serving), host=settings.host, port=settings.port, log_level="warning")
    finally:
        pool.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
