TITLE = "Baseline Sparse Autoencoder"
DESCRIPTION = """The plain ReLU SAE with an L1 penalty and unit-norm decoder rows: the reference
every study compares against."""
