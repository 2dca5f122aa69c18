"""Transports: how the orchestrator reaches its stage workers (this process, processes, Ray actors)."""
