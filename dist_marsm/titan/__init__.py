"""torchtitan 0.3.0 glue (layer 4): the only package that imports torchtitan; ``import dist_marsm`` never
imports it, and importing this package alone is cheap. Modules: ``optimizer_container`` (``MARS-M`` as a
torchtitan optimizer, its typed config from ``dist_marsm.settings``, the resume policy), ``recipe`` (TOML
onto ``Trainer.Config``, tyro overrides, recipe checks), ``config_registry`` (``python -m torchtitan.train
--module dist_marsm.titan --config <recipe>``), ``metrics`` (MARS-M metrics, JSONL logger backend),
``cpu_shims`` (what the Trainer needs on a CPU-only machine), ``corpus`` (the embedded corpus and tokenizer),
``elastic`` (fresh rendezvous keys per torchrun restart), ``moe`` (deepseek_v3's ``debugmodel_cpu`` MoE flavor).
"""
