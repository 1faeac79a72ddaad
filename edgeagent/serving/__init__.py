"""The local inference endpoint: HTTP/1.1 or binary frames on a Unix socket, hot-swappable named models.

See ``docs/runtimes.md`` for the protocol and :mod:`edgeagent.client` for the client.
"""

from edgeagent.serving.server import InferenceServer, Prediction, ServerLimits
from edgeagent.serving.slots import ServedModel
from edgeagent.serving.stats import RequestStats, StatsKey

__all__ = ["InferenceServer", "Prediction", "RequestStats", "ServedModel", "ServerLimits", "StatsKey"]
