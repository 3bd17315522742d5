"""Running a batch as a service: health, metrics, and the endpoints that serve them.

health.py    Health, HealthCheck: live/ready and the reasons (no dependency)
recorder.py  what the pipeline records for metrics (no dependency)
metrics.py   the Prometheus collector over a batch's runs (imports prometheus_client)
endpoints.py /metrics, /healthz, /readyz: an ASGI app, and a small HTTP server for the CLI

Only ``metrics.py`` imports ``prometheus_client``, and only a batch with metrics on imports it.
"""
