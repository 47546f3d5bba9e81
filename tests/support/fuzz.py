"""
Hypothesis settings for the suite's fuzz tests: more examples than
Hypothesis's default, and no deadline, since CI machines are shared and a
slow example is not a failure.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def fuzz(max_examples: int = 300) -> settings:
    """Settings for a fuzz test of C{max_examples} examples."""
    return settings(
        max_examples=max_examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )


#: The settings most fuzz tests use.
FUZZ = fuzz()
