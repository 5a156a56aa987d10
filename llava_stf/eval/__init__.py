"""Evaluation: one generation engine, a pure scoring library (``llava_stf.eval.scoring``) and one small declarative
module per benchmark. Importing this package imports nothing heavy.
"""
