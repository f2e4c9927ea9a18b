"""The evidence study (``morphcache study run | report``): cache vs live teacher, views per image, DTM vs
token-wise, int8 vs float16, and DTM's mechanism on controlled spatially inconsistent targets."""
