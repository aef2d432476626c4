"""The graph IR helpers that passes, analyses and front ends share: tracing, example inputs, channel labels,
masks as parametrizations, masked norms, weight ops, the modules passes insert, verification and shadow execution.

Nothing here imports a pass, a front end or a backend (tests/test_architecture.py checks it).
"""
