"""Phantoms, the series writer and synthetic cohorts: used by tests, the demo and benchmarks, never
by the runtime path.
"""
