"""Wire transport: generated gRPC stubs, tensor conversion and validation, channel helpers."""
