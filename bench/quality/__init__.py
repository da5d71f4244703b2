"""Do the sparse attention families learn? Long-range synthetic tasks against dense attention.

Modules: :mod:`tasks` (MQAR, needle, local copy generators), :mod:`models` (the five families at
matched size, with the sparse settings used here), :mod:`train` (one training run), :mod:`report`
(markdown and loss-curve plot) and :mod:`run` (the command line). Run from the repository root:

    nice -n 10 python bench/quality/run.py            # the full configuration
    python bench/quality/run.py --help                 # smaller settings
"""
