"""Research scripts behind the project's counterfactual recipes (``python -m experiments.<name> --help``).

Each appends one JSON line per measurement to a file of its own (the committed ones are in ``benchmarks/baselines/``
and rendered in ``benchmarks/RESULTS.md``); unlike the benchmark suites they have no baseline check. They call the
same counterfactual engine and pipeline functions as the product.
"""
