"""Steps: one partition's work, Dagster-free (plan, skip what exists, make the rest, record).

``skeleton`` is what every generating step shares; ``images``, ``clips``, ``scores`` and
``comparison`` are the steps the assets of ``defs/`` call.
"""
