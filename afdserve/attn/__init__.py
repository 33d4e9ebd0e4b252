"""The attention side of a disaggregated deployment."""
