"""danon.passes."""
