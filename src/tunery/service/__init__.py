"""The service's rules, once, under every API: trainings (typed inputs, one data check, method
and format), files (upload, the one file check, result files), predictions (version lookup,
capacity, sampling), exports and bases. Each API under `server/` parses its own wire shape, calls
these functions and renders their results and `service.errors` in its own shapes.

Nothing here imports from `server/`; torch is imported only where a model runs (the prediction
runner's engines, on first use)."""
