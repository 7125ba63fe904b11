"""Test configuration: hypothesis profiles.

* ``ci`` (default): ``derandomize=True`` — every run explores the same examples, so CI is
  deterministic — a modest ``max_examples`` to keep the suite fast, no deadline (the first call of a
  test pays torch's warm-up), no example database.
* ``dev``: random exploration with more examples; select it with ``HYPOTHESIS_PROFILE=dev``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=20,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
