"""Stage 1, the slide: opening whole-slide images (readers, header checks), finding them in folders, and reading
them in a child process that a crash cannot take down.
"""
