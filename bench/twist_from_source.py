"""
`twist`, with the pgtls plugin of another source tree: what --baseline-src
runs. Twisted finds plugins in its own twisted/plugins first, where the
installed pgtls's plugin lives, so a tree whose plugin names another module
(the package layout changed) would otherwise start the installed code's.

Usage: python bench/twist_from_source.py SOURCE_DIR [twist arguments...]
"""

import importlib.util
import sys
from pathlib import Path

source = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(source))
spec = importlib.util.spec_from_file_location(
    "pgtls_baseline_plugin", source / "twisted" / "plugins" / "pgtls_plugin.py"
)
assert spec is not None and spec.loader is not None
plugin = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plugin)

from twisted.application.twist import _options  # noqa: E402
from twisted.application.twist._twist import Twist  # noqa: E402

_options.getPlugins = lambda interface: [plugin.pgtls]  # type: ignore[assignment]
Twist.main(["twist", *sys.argv[2:]])
