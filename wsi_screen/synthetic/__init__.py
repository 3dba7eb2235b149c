"""Synthetic slides and calibration cohorts built from labelled patches (slide-level truth for tests, benchmarks
and the slide rule's calibration). Nothing in the pipeline imports it.
"""
