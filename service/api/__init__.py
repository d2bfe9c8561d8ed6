"""The HTTP API: the /v1 router, its dependencies, quotas and request limits, and one router per resource."""
