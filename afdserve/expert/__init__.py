"""Expert side of a disaggregated deployment: where experts live (``placement``)."""
