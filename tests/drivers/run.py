"""
C{python tests/drivers/run.py DRIVER}: one Python driver's scenarios
against one route, as L{harness} describes; the test runs it as a child.
"""

from __future__ import annotations

import importlib
import sys

from harness import main

#: The module (py_NAME.py) and the scenarios in it of each driver.
PROGRAMS = {
    "psycopg": ("py_psycopg", "SCENARIOS"),
    "psycopg2": ("py_psycopg2", "SCENARIOS"),
    "asyncpg": ("py_asyncpg", "SCENARIOS"),
    "pg8000": ("py_pg8000", "SCENARIOS"),
    "sqlalchemy_psycopg": ("py_sqlalchemy", "ON_PSYCOPG"),
    "sqlalchemy_asyncpg": ("py_sqlalchemy", "ON_ASYNCPG"),
}

if __name__ == "__main__":
    module, attribute = PROGRAMS[sys.argv[1]]
    main(getattr(importlib.import_module(module), attribute))
