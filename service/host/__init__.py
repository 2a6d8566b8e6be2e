"""Several API processes over one host's GPUs: ``ditepose serve --api-processes N``.

The parent process is the inference host (:mod:`.inference`): it owns the real
:class:`~ditepose.service.batching.pool.WorkerPool` (the models on every device) and the
admission count. It starts N front-end processes (:mod:`.frontend`), each serving REST and
gRPC on the shared ports (SO_REUSEPORT) over a :class:`~.remote.RemotePool`, which sends crops
to the host through shared memory (:mod:`.slots`) and small control messages through a pipe.
Crops of every front-end meet in the host's batchers, so batches are as large as the whole
host's traffic allows and the queue bounds and in-flight limit hold per host
(:mod:`.admission`). See docs/architecture.md, "Several API processes".
"""
