"""
Helpers shared by the test suite, the demo and the benchmarks: a throwaway PKI
and throwaway PostgreSQL clusters.
"""
