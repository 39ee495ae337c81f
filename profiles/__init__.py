"""Shipped profiles (data only): ``load_profile("h200/gpt2-medium")`` finds them by name."""
