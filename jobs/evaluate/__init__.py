"""Evaluations of the whole system on a stream: behind ``jobs.replay``, ``jobs.freshness`` and ``jobs.bandit``.

- ``streams``: the stream cut into steps (one landing file each, or N minutes of event time each),
  the generated stream's spec and truth;
- ``variants``: predict then learn: each variant of the model on its own copy of the tables, every
  step scored by the model as it was before the step, then learnt from;
- ``figures``: AUC, log loss and per-entity AUC of scored events; ``plots``: the PNGs;
- ``bandit``: the closed-loop simulation's world (the generator's truth), requests, policies, clicks
  and regret.

A package never imports an entry point: the jobs (the nearline updater, the nightly run, scoring)
are handed in by the entry points as callables.
"""
