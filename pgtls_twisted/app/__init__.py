"""
The application: the service tree with reload, drain and pause
(C{_service}, C{_reload}, C{_listening}, C{_sessions}), the metrics
endpoint (C{_metricsweb}), signals (C{_signals}), the C{twist}/C{twistd}
plugin (C{_tap}) and C{workers = N} (C{_workers}). The top layer: it wires
the others together.
"""
