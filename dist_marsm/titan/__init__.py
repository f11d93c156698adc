"""torchtitan 0.3.0 glue (layer 4), the only package that imports torchtitan; docs/torchtitan.md lists its
modules."""
