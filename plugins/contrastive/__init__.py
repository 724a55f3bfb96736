TITLE = "Ultra-Stable Hybrid Contrastive SAEs with Coordinated Dynamic Thresholds"
DESCRIPTION = """1. Increase JL projection dimension to 128
2. Add lightweight EMA (β=0.9) for utilization tracking
3. Implement coordinated cosine annealing for contrastive threshold (0.4→0.05)
4. Introduce step-dependent λ_i bounds (0.02-1.0 → 0.01-0.5)
5. Validate JL approximation quality via reconstruction tests
6. Compare final feature activation sparsity distributions"""
