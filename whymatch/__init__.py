"""whymatch: image similarity search that says why two images match."""
