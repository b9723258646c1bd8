"""Benchmarks: `python -m bench [NAME ...]` (`make bench`); each prints ratios, asserts nothing.

Speed is measured, not asserted by a timer (DEVELOPERS.md): each benchmark prints
figures and their ratios against a baseline measured in the same run.
"""
