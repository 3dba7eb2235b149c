"""Stage 3, training: labelled patch datasets, the training loop and its recipes, checkpoints, cross-validation,
evaluation and the hyper-parameter search.
"""
