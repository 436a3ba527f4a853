"""The method, readable in one sitting: a trained DAE's encode / invert / decode, linear heads on the semantic latent
z_sem and their calibration to grades, the directions and moves that make counterfactuals, and the measures of both.

Reading order (after ``harness/diffusion/ddim.py`` and ``harness/models/dae.py``): ``autoencoder`` (encode, invert,
decode a batch) -> ``heads`` (linear heads, signed distance of Eq. 3) -> ``calibration`` (distance -> grade and back)
-> ``directions`` (where a CE moves z_sem) -> ``counterfactual`` (the one CE engine: Eq. 4, grade targets,
strips, rendering; ``gain`` its realisation gain, ``counterfactual_quality`` its measures) -> ``probes`` (the
measures that cannot be fooled). Beside them: ``latents`` and ``latents_formats`` (the latents table
and latents brought from elsewhere), ``head_tasks`` (tasks and labels; the task type and a head's fitting choices
live in ``harness.config``), ``metrics`` and ``grading`` (detection, grading, image and CE metrics), ``floors``
(what a head reaches without a trained DAE).
"""
