"""The HTTP side of the coordinator: the OpenAI-compatible API, Prometheus metrics, the status
page (api.py, metrics.py, status_page.py, static/), and YAML config files for the CLI."""
