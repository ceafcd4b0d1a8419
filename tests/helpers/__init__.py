"""Shared test helpers (importable as `helpers`: pytest puts tests/ on sys.path). conftest files hold
only fixtures: cli.py runs the CLI as a process, cluster.py starts real clusters and waits with
deadlines, tiny_model.py writes the tiny random GGUF."""
