"""
The C{pgtls} plugin for C{twist} and C{twistd}, and the C{pgtls} reactor
(C{--reactor=pgtls}, the default for C{twist pgtls}: see
L{pgtls_twisted.app._reactor}).

Kept trivial on purpose: every module in C{twisted/plugins} is imported
whenever Twisted scans for plugins, so this only names where the real
code lives (L{pgtls_twisted.app._tap}), which is imported when the command runs.
"""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

pgtls = ServiceMaker(
    "pgtls",
    "pgtls_twisted.app._tap",
    "TLS-terminating proxy and connection pooler for PostgreSQL",
    "pgtls",
)

pgtlsReactor = Reactor(
    "pgtls",
    "pgtls_twisted.app._reactor",
    "epoll with a short dispatch path for pgtls's relay (Linux)",
)
