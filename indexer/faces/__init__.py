"""Detecting, aligning and describing the faces in photos that are not CelebA crops."""
