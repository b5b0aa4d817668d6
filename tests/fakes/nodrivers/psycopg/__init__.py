# Shadows the real psycopg: a machine where the driver is not installed.
raise ImportError("No module named 'psycopg'")
