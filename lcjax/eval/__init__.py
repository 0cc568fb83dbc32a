"""Long-context evaluation of trained runs: PassKey retrieval (:mod:`lcjax.eval.passkey`); harder tasks
(multi-key, multi-value, variable tracking) come next (docs/evaluation.md). Uses model, data and
checkpoint; never imports lcjax.train."""
