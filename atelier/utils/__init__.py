"""Small helpers every layer uses: atomic file writes and full-disk errors (atomic.py), keeping
optional heavy imports away (lean_imports.py), quieting third-party warnings (quiet.py)."""
