"""Label Studio in the loop: a local server, project bootstrap, push with pre-annotations, annotation sync.

Modules: ``server`` (start/stop a local Label Studio, credentials), ``client`` (the API
adapter with retries), ``project`` (labeling config, idempotent bootstrap), ``push``
(tasks exactly once, pending on outage), ``sync`` (consensus, agreement, labels/),
``annotator`` (a simulated annotator using the browser's API), ``agreement`` (pure math).
"""
