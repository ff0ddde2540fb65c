"""``swarm monitor``: a self-hosted health page of a swarm (one HTML page, its assets and /api/status)."""
