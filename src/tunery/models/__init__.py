"""Base models: resolve a name to weights, load them, and adapt them for training."""
