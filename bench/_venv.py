"""
Re-execute a bench script under the project's virtualenv (.venv, made by
C{make install}), whose installed pgtls_twisted is what gets measured.
Standard library only: it runs before anything of the project is importable.
"""

import os
import sys
from pathlib import Path


def reexec(script: str) -> None:
    """Become C{.venv/bin/python script ...} unless already running under it."""
    path = Path(script).resolve()
    venv = path.parent.parent / ".venv"
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    python = venv / "bin" / "python"
    if not python.exists():
        sys.exit(f"{sys.argv[0]}: {python} not found; run `make install` first")
    os.execv(str(python), [str(python), str(path), *sys.argv[1:]])
