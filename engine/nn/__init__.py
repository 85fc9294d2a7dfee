"""The networks: ImageNet backbones (a registry of them) and the Siamese presets built on them (``PRESETS``)."""
