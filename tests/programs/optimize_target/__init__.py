"""A program for `dspy-service optimize` tests: two predictors, one of them pinned to another model
in models.yaml, and custom metrics as a user would write them."""
