# Generated from proto/consortium.proto by `python -m consortium.transport.codegen`; do not edit.
