"""Evaluation: rarity and quality of generated runs against a reference, and scoring a user's images."""
