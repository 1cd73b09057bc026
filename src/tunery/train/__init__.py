"""Training: the recipe (one function, top to bottom) and its event stream."""
