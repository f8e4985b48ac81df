"""Patch features: encoders (registry, weights), extraction of a slide's patches into feature bags,
and the bag files themselves."""
