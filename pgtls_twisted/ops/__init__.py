"""
Operations: the admin console (C{_console} for who may open it and the
protocol, C{_commands} for the commands), what is counted (C{_metrics}),
and the log formats and the C{log_level} filter (C{_logs}).
"""
