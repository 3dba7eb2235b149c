"""Embeddings of slides: patches -> an encoder -> one feature store per slide (``wsi-screen embed``).

Slides are tiled by the tiler (at the encoder's mpp and size unless told otherwise) or given as patch stores;
every patch is embedded by a :class:`~wsi_screen.models.encoder.Encoder` and the features, their level-0
coordinates and the encoder's identity are written to ``OUT/<slide>.zarr`` (:mod:`wsi_screen.embedding.features`,
the feature store's one module). Embeddings are the input of slide-level models trained from slide labels.
"""
