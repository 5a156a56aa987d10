"""The embedded default: a generated visual-QA world, a small pre-trained vision tower, and the full pipeline on CPU.

``python -m llava_stf.demo`` runs it (see ``__main__``).
"""
