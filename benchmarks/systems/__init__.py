"""The systems under test, each runnable as ``python -m benchmarks.systems.NAME``.

Each child prints one JSON object on its last stdout line (what it handled, its own timings).
"""
