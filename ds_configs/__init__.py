"""The DeepSpeed ZeRO JSONs (zero1, zero2, zero3, zero3_offload), installed as package data ``pixeldit.ds_configs``.

This folder is the source of truth; the wheel maps it to ``pixeldit.ds_configs`` (pyproject.toml
``package-dir``), and ``pixeldit.train.ds_config`` reads it with ``importlib.resources``. See README.md.
"""
