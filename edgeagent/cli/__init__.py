"""Command-line programs: ``edgeagent`` (device) and the shared pieces of ``edgectl`` (host)."""
