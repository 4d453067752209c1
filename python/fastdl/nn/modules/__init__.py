"""torch.nn modules with torch's constructors, parameter names and state_dict layout.
One module per op family (pool.py, linear.py, ...), re-exported here."""
