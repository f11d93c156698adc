"""torchtitan 0.3.0 glue (layer 4): the only package that imports torchtitan; importing it alone is cheap.
Modules: docs/torchtitan.md (table of files).
"""
