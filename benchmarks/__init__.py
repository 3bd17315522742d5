"""The asyncbatch benchmark suite: ``python -m benchmarks.run [--quick]`` (``make bench``).

Every system is measured as its own child process over the same generated inboxes; the driver
(:mod:`benchmarks.run`) writes ``benchmarks/RESULTS.md`` and ``benchmarks/throughput.png``.
Nothing here is imported by the ``asyncbatch`` package.
"""
