"""Tools that build the embedded demo model (assets/demo).

Training-time only: torch and transformers are used here and never by the app at run time.
"""
