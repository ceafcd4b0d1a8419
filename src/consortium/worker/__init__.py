"""The worker: a layer range with per-session KV caches behind a gRPC server."""
