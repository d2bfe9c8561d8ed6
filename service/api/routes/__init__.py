"""One FastAPI router per resource (jobs, cost, metrics, evaluation, artifacts, report, users), and health."""
