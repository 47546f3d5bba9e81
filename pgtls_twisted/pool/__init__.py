"""
Connection pooling: pooled sessions and their pool managers (C{_session}),
the pools' bookkeeping (C{_pool}), pgtls's own logins as the service user
(C{_serverlogin}) and the query log (C{_querylog}).
"""
