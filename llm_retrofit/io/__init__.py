"""Reading and writing checkpoints: the lazy reader, the streaming safetensors writer, the atomic commit of a
rewritten directory, provenance records and fingerprints, the bundled model, and `retrofit inspect`.

Nothing here knows about patches or plans; `plan.py` builds on it.
"""
