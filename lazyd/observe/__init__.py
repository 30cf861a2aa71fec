"""What lazyd tells: log lines (plain, journal or JSON, with structured
fields), `status`, the Prometheus metrics and `lazyd analyze`.  Reads the
runtime's state; changes nothing.
"""
