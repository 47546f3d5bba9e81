"""
TLS: the contexts and policy of both legs (C{_contexts}), how TLS is put
under a connection that is already open (C{_lean}), and the one module
that touches Twisted's and pyOpenSSL's private names.
"""
