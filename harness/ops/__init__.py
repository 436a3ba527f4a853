"""Operations around the method: MLflow tracking and the model registry, the served explainer, Ray Tune head
sweeps, the supervised DenseNet121 baseline, the DAE-vs-baseline comparison, and the head-fitting job.

Reading order: ``tracking`` (the one door to MLflow) -> ``registry`` (what a registered DAE carries, promotion) ->
``serving`` (the MLflow pyfunc explainer) -> ``fit_heads_job`` (heads on any latents table) -> ``sweep`` then
``sweep_job`` (one trial and the selection rule, then the Ray Tune run) -> ``baseline`` then ``baseline_job``
(DenseNet121 from scratch, then under Ray Tune) -> ``compare`` then ``compare_job`` (DAE + head vs the baseline,
task by task). Each ``*_job`` module is a step's command line (``python -m harness.ops.<name>``, or its ``dae-cf``
verb).
"""
