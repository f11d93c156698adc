"""torchtitan 0.3.0 glue (layer 4): the only package that imports torchtitan.

``import dist_marsm`` never imports this package. One concern per module:

* :mod:`~dist_marsm.titan.cpu_shims` - the four things torchtitan's Trainer needs on a CPU-only machine
* :mod:`~dist_marsm.titan.corpus` - embedded pydoc corpus, train/validation split, local BPE tokenizer
* :mod:`~dist_marsm.titan.optimizer_container` - ``MARS-M`` as a torchtitan optimizer name
* :mod:`~dist_marsm.titan.recipe` - TOML recipe -> ``Trainer.Config`` (validation, overrides)
* :mod:`~dist_marsm.titan.metrics` - optimizer time, output-layer norm, metrics.jsonl, loss PNG
* :mod:`~dist_marsm.titan.config_registry` - ``python -m torchtitan.train --module dist_marsm.titan --config <name>``

Importing this package itself is cheap (no torchtitan import until a submodule is used).
"""
