"""Evaluation: the named measurements of a trained DAE, above the method and below the operations.

``evaluate`` (heads, floors, reconstruction, z-usage, counterfactual sets and their figures, each a named function
the pipeline calls), ``floors`` (the same heads on raw pixels and on a randomly initialised encoder),
``training_probe`` (what training prints at every preview), ``report`` (the HTML report) and ``figures``.
"""
