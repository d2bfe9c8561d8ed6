"""Running jobs: a submitted spec made runnable, the queue and reconciler, the job actor and its events recorder."""
