"""Stage 4, screening: scoring patch stores, slide-level rules and their calibration, the run folder and what it
holds (heatmaps, GeoJSON, results, report).
"""
