"""The built-in example: Gemma 3 270M distilled for review sentiment (`shrink demo`)."""
