"""A client of a running tunery server over Replicate's HTTP API (`api.Api`) and the `tunery`
commands built on it (`commands`)."""
