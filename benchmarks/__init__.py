"""Rerunnable benchmarks of mona_peft: parameter counts (``params``), speed and memory (``speed``), a profile of
Mona's compute (``profile_mona``), and the generator of ``docs/benchmarks.md`` and ``docs/profile.md`` (``report``).

Run them from the repository root as modules, e.g. ``python -m benchmarks.params``; each writes JSON to
``benchmarks/results/`` and ``python -m benchmarks.report`` renders the docs from that JSON.
"""
