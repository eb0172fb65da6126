"""flatworld: train world models, and any PyTorch model, toward flatter minima."""

__version__ = "0.1.0"
