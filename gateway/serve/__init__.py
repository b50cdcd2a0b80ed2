"""Processes: ``gateway serve --workers N`` (``workers``), the event loop, free ports for
the processes tests and benchmarks start, and ``gateway demo``. The top floor with
``gateway.cli``.
"""
