"""The benches' clients are tested against the service tests' shared live server."""

from tests.service.conftest import hrnet18_checkpoint, server  # noqa: F401 - fixtures
