"""The HF side of dsjax: config.json fields, official tensor names, and safetensors files.

`names.py` is the one place where HF tensor names meet dsjax parameter paths; the loader here
and the checkpoint converter both use it.
"""
