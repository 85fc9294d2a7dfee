"""Explanations of pair decisions: pair Grad-CAM (``cam``, ``pairs``), coalition attributions over both
images' cells (``coalitions``), region correspondences, ImageNet concepts, masking effects and the figures
that draw them. Each works from a network and feature maps or stored projections; none loads a model."""
