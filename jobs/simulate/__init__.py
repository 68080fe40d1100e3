"""A synthetic stream of training events with a known ground truth (``python -m jobs.generate``)."""
