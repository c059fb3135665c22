"""affectloop: batch multimodal emotion recognition with an active-learning labeling loop.

Layout (see README): ``model/`` is the machine learning, ``tasks/`` are units of work on
one partition, ``flows/`` compose them with Prefect. This package holds what all three
share: settings, data contracts (schemas) and atomic file I/O.
"""

__version__ = "0.1.0"
