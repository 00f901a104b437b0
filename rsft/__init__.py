"""Rejection sampling fine-tuning (RSFT) of generative adversarial networks."""
