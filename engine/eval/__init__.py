"""Measuring models and explanations: metrics, evaluation as ``whymatch eval`` runs it, faithfulness
curves, the randomisation sanity check and the concept-masking check."""
