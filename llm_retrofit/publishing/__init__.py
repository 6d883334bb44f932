"""Publishing: model cards (`card`, Jinja `templates/`), where the base model came from (`lineage`), and the
upload to the Hugging Face Hub (`hub`).
"""
