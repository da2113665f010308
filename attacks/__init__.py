"""Attacks on concept erasure: one module per attack (harness/attack.py is the contract)."""
