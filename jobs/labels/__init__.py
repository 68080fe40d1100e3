"""The streaming production of training data: impressions and clicks joined into labelled events (docs/label_join.md).

``schemas`` holds the join's record shapes, ``inputs`` reads the two streams into one, ``join`` is one micro-batch's
semantics (a function of the state before it and its arrivals), ``joiner`` writes its results exactly once.
"""
