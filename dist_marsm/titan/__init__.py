"""torchtitan 0.3.0 glue (layer 4): the only package that imports torchtitan; importing it alone is cheap.
Modules: optimizer_container, recipe, config_registry, metrics, cpu_shims, corpus, moe, qk_clip_hooks
(docs/torchtitan.md describes each).
"""
