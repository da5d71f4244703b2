"""danon.kernels."""
