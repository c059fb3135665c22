"""The machine learning of affectloop, and nothing else (no Prefect, Dask or Label Studio).

- ``model.inputs``: features table -> named model inputs and presence masks.
- ``model.layers`` / ``model.network``: custom Keras layers and the fusion network builders.
- ``model.estimator``: ``FusionClassifier``, the scikit-learn-style wrapper (fit, calibrate, save/load).
- ``model.calibration``, ``model.metrics``: temperature scaling, metrics, report plots.
- ``model.splits``: speaker-grouped / stratified splits and folds.
- ``model.registry``: versions under ``models/``, model cards, the ``PRODUCTION`` pointer.
- ``model.selection``: choosing records for annotation.

Submodules are imported explicitly; importing ``model`` itself loads nothing heavy.
"""
