"""Clinical finding labels per study: the 14 CheXpert observations, read from a CheXpert-format
labels file (`labels`) or derived from report text by a rule labeller built on spaCy and negspacy
(`labeller`). Neither imports JAX or torch.
"""
