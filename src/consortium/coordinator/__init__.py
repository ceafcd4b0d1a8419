"""The coordinator: node registry, placement, sessions and the token loop (gRPC server),
its client, and a launcher for local clusters."""
