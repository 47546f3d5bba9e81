"""
The PostgreSQL protocol as pgtls needs it, and nothing else: the wire codec
(C{_wire}), message framing by headers (C{_framing}), transaction and
parameter state (C{_txstate}, C{_parameters}), SCRAM as client and server
(C{_scram}, C{_scramserver}), the backend authentication policy
(C{_authpolicy}), the SQL lexer and password redaction (C{_sqllex},
C{_redact}).

Pure code: no Twisted, no I/O, no clock; the bottom layer. Every length
field is bounded before anything is allocated for it.
"""
