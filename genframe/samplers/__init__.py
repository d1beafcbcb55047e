"""Noise schedules and samplers for diffusion models: small objects chosen at generate time."""
