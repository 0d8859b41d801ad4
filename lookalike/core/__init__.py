"""The lowest layer: primitives that ``models``, ``index``, ``evaluation`` and ``service`` share.

Nothing here imports any other lookalike package, torch, timm or FAISS, so every layer above
may import it and it stays cheap to import.
"""
