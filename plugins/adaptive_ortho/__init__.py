TITLE = ("Adaptive Orthogonal Feature Learning for Optimal Knowledge Separation in Sparse "
         "Autoencoders")
DESCRIPTION = """1. Implement adaptive orthogonality loss with controlled feature sharing
2. Add batch-wise feature grouping with periodic updates
3. Train on Pythia-70M using WMDP-bio and WikiText datasets
4. Compare unlearning performance against baseline and fixed orthogonal SAE
5. Analyze condition numbers of feature subspaces
6. Evaluate impact of different α values for controlled sharing"""
