"""dreg's Hydra launcher plugin: ``hydra/launcher=packed`` (:mod:`dreg.packed_launcher`)."""
