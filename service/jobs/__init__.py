"""Offline evaluation jobs: catalogue, records, the shared task body, Celery and embedded executors."""
