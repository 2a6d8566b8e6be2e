"""The job tests' fixtures, registered once for this folder: they live in support.py because
other folders' tests (reliability) import them too."""

from tests.service.jobs.support import job_pool, one_torch_thread, redis_server, synth_eval, tiny_eval

__all__ = ["job_pool", "one_torch_thread", "redis_server", "synth_eval", "tiny_eval"]
