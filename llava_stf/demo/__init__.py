"""The embedded default: a generated visual-QA world, a small pre-trained vision tower, and the full pipeline on CPU.

``python -m llava_stf.demo`` runs it (``__main__``); ``pipeline`` holds the steps and their reuse rules, ``vision``
the tiny CLIP pre-training, ``compare`` the projector comparison (``python -m llava_stf.demo compare``).
"""
