"""
The proxy proper, where a client's bytes go: the client leg
(C{_frontend}), the login gate (C{_logins}), the route (C{_route}), the
backend leg and connector (C{_backend}), the pass-through session
(C{_session}), the pump (C{_pump}), cancel requests (C{_cancel}), and what
the legs share (C{_leg}). C{_interfaces} names the seams the layers above
plug into.
"""
