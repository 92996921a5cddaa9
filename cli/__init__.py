"""rnnd: a streaming inference daemon for stateful sequence models.

``rnnd.daemon`` serves bundles (no torch); ``rnnd.export`` makes them (torch).
"""

__version__ = "0.1.0"
