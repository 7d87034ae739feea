"""Deployment artefacts: the container image and Compose, built and run for real."""
