"""Training workers: claim queued trainings under a lease, run each in a child process, report
logs and metrics, and deliver webhooks.

`runner.Worker` runs trainings, `webhooks.WebhookSender` delivers webhooks, `service.EmbeddedWorkers`
runs both inside the API server, and `cli` has the `tunery worker` command. This module imports
nothing, so that the training child (`python -m tunery.worker.child`) starts light.
"""
