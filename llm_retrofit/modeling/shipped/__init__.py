"""Modeling files shipped inside patched checkpoints (named by auto_map); they import nothing from llm_retrofit."""
