"""Training a Siamese model on cached backbone features (``whymatch train``)."""
