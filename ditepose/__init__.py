"""DitePose: Dite-HRNet pose estimation, trained, evaluated and served.

The one import root of the project. Its sub-packages are the repository's top-level folders:

* :mod:`ditepose.model`: the networks, checkpoints, codecs and the top-down pipeline;
* :mod:`ditepose.training`: datasets, augmentation, the trainer and the metrics;
* :mod:`ditepose.service`: REST, gRPC, batching, jobs and video streams;
* :mod:`ditepose.proto`: the gRPC API definition and its generated stubs.
"""

__version__ = "0.1.0"
