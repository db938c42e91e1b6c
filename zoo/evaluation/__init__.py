"""Evaluating zoo models: log-likelihoods and perplexity (:mod:`.scoring`, no extra dependency) and the
lm-evaluation-harness model ``zoo`` (:mod:`.harness`, imported only when lm-eval is wanted: ``zoo eval``)."""
