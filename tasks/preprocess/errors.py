"""Errors of the preprocessing layer that are not a bad record."""


class ExtractorUnavailable(RuntimeError):
    """An extractor's model or package cannot be loaded: a broken install, not a bad record.

    ``tasks.features`` lets it fail the partition instead of rejecting (and caching as bad)
    every record of the modality.
    """
