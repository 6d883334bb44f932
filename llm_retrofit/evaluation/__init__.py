"""Measuring a model: long-document perplexity by length (`perplexity`), passkey retrieval, the documents they
read, and the result as data with its renderings (`report`: Markdown, rich tables, JSON, plots).
"""
