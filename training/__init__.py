"""Training recipe, datasets and evaluation metrics for Dite-HRNet."""
