"""On-disk formats: float source models, quantkit's own checkpoints, the compressed-tensors export,
transformers' loader integration and ``inspect``. Built on :mod:`quantkit.core`."""
