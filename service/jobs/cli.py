"""``ditepose worker``: a Celery worker for the evaluation jobs (settings from ``DITEPOSE_*``)."""

from __future__ import annotations

import argparse


def add_worker_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker",
        help="run a Celery worker for evaluation jobs (needs DITEPOSE_REDIS_URL)",
        description="Consume POST /v1/evaluate jobs from Redis. Datasets, checkpoint folder and "
        "limits come from DITEPOSE_* variables (docs/configuration.md); run as many workers "
        "as you like, on any machine that sees the same files.",
    )
    p.add_argument("--concurrency", type=int, default=1, help="jobs run in parallel by this worker (default 1)")
    p.add_argument("--queues", default=None, help="comma list of queues (default: DITEPOSE_JOB_QUEUE)")
    p.add_argument(
        "--pool", choices=("prefork", "threads", "solo"), default="prefork",
        help="prefork (default) enforces the hard time limit and requeues a job whose child died",
    )
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname", default=None, help="Celery node name (default: ditepose@<host>)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve the job metrics on this port")
    p.add_argument(
        "--metrics-host", default="127.0.0.1",
        help="interface of the metrics server (default %(default)s; 0.0.0.0 in a container)",
    )
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    if args.metrics_port is not None:
        from ditepose.service.jobs.metrics import enable_multiprocess_metrics, serve_worker_metrics

        enable_multiprocess_metrics()  # before any metric object exists
        serve_worker_metrics(args.metrics_port, args.metrics_host)
        _sample_gpu_memory(args.pool)

    from ditepose.service.core.settings import Settings
    from ditepose.service.jobs.celery_app import limit_threads, make_celery

    settings = Settings()
    if settings.torch_threads:
        limit_threads(settings.torch_threads)
    app = make_celery(settings)
    queues = args.queues or settings.job_queue
    argv = [
        "worker",
        f"--concurrency={args.concurrency}",
        f"--queues={queues}",
        f"--pool={args.pool}",
        f"--loglevel={args.loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0


def _sample_gpu_memory(pool: str) -> None:
    """GPU memory gauges from the processes that run jobs (prefork children, else this one).

    A prefork child that exits marks itself dead, so its live gauges (GPU memory, running jobs)
    leave the worker's /metrics instead of lingering.
    """
    from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

    from ditepose.service.core.metrics import start_gpu_memory_sampler

    def _start(**_: object) -> None:
        start_gpu_memory_sampler()

    def _dead(**_: object) -> None:
        import os

        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())

    (worker_process_init if pool == "prefork" else worker_ready).connect(_start, weak=False)
    worker_process_shutdown.connect(_dead, weak=False)
