"""danon.backends."""
