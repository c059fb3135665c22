"""affectloop: batch multimodal emotion recognition with an active-learning labeling loop.

The top floor of the tree (see README, *Architecture*): the ``affectloop`` command line,
``affectloop status`` and the demo-data generator. Below it: ``flows/`` (Prefect flows
that compose tasks), ``tasks/`` (units of work), ``model/`` (the machine learning) and
``core/`` (settings, data contracts, the data-root layout, atomic I/O, process supervision).
"""

__version__ = "0.1.0"
