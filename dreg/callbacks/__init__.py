"""Lightning callbacks for training diagnostics, each built by Hydra from its ``_target_``:
``grad_stats`` (:mod:`dreg.callbacks.grad_stats`) and ``estimator_compare``
(:mod:`dreg.callbacks.estimator_compare`); definitions and DDP semantics in
docs/diagnostics.md. Nothing is imported here, so building one callback loads only its module.
"""
