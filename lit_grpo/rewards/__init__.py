"""Rewards for edits: segmenters, edit-specific scores and their composition."""
