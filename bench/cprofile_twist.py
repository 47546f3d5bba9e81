"""
Run C{twist} under cProfile, for C{bench/run --profile}.

    python bench/cprofile_twist.py OUTPUT.prof pgtls --config routes.toml

The statistics are written to C{OUTPUT.prof} when the reactor stops
(SIGTERM or SIGINT). cProfile slows the process down, but unlike a sampling
profiler it counts every Python call, so calls per transaction are exact.
"""

from __future__ import annotations

import cProfile
import sys

from twisted.application.twist import _twist
from twisted.application.twist._twist import Twist


def main() -> None:
    output, argv = sys.argv[1], sys.argv[2:]
    # twist re-raises a stopping signal at itself once the reactor is done,
    # which would end the process before the statistics are written.
    _twist._exitWithSignal = lambda sig: None  # type: ignore[attr-defined]
    profile = cProfile.Profile()
    profile.enable()
    try:
        Twist.main([sys.argv[0], *argv])
    except SystemExit:
        pass
    finally:
        profile.disable()
        profile.dump_stats(output)


if __name__ == "__main__":
    main()
