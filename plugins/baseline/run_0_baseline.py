"""Baseline: the plain ReLU SAE with L1 sparsity and unit-norm decoder rows.

Every study's run 0. Nothing is overridden: the harness's base SAE and trainer are the baseline.
"""
