"""What the service reports of a job, read from the store: its cost, the polled views, the HTML report, metrics."""
