TITLE = "Frequency-Based Feature Ordering in Sparse Autoencoders"
DESCRIPTION = """1. Implement activation frequency tracking
2. Apply batch-wise ordering constraints
3. Analyze feature activation patterns
4. Compare feature interpretability
5. Evaluate ordering stability"""
