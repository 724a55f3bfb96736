TITLE = ("Self-Correcting Orthogonal SAEs with Adaptive Z-Score Thresholding and Feature "
         "Reactivation")
DESCRIPTION = """1. Calculate dynamic thresholds via EMA(μ) + 2*EMA(σ)
2. Implement linear ortho penalty weighting (EMA(h_ih_j) - τ)
3. Revive dead features contributing to high interference
4. Use rank-32 randomized SVD for covariance
5. Train on Gemma-2B with full benchmark suite
6. Evaluate core, sparse_probing, and WMDP metrics
7. Analyze reactivation impact on feature diversity"""
