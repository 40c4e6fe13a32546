"""What each row of an activation store is: its token kind and the metadata columns beside it.

Shared by the writer (the torch bridge's export), the readers (training, interpretation) and the
config's validation, so it imports nothing of jaxsae's.
"""

__all__ = ['TOKEN_KINDS', 'TOKEN_COLUMNS']

# What each exported token is (the store's `kind` column holds the index into this tuple).
TOKEN_KINDS = ('image', 'prompt', 'boilerplate', 'report')

# Per-row token metadata: the study's manifest index, the token's position in the model's input,
# its token id, its kind (index into TOKEN_KINDS), and for image tokens the patch index and which
# image (0 frontal, 1 lateral or prior, 2 prior); -1 otherwise.
TOKEN_COLUMNS = ('study', 'position', 'token_id', 'kind', 'patch', 'image')
