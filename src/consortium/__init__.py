"""Consortium: verified, fault-tolerant pipeline-parallel LLM inference."""

__version__ = "0.1.0"
